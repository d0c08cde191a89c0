"""Is the demo recipe the same after a refactor? Fingerprints of its data and of a short run.

    python bench/recipe_determinism.py record OUT.json [--scale 0.02] [--no-run]
    python bench/recipe_determinism.py compare BEFORE.json AFTER.json

`record` writes, for the default `Recipe()` at full size, a SHA-256 of every stage's rows (token
ids, loss masks with the value marks, categories), of each stage loader's first epoch order and
first batches (word dropout included), and of the held-out batches, with a few decoded samples;
then it runs `dsv32 train --recipe demo --scale S --no-eval` into a temporary directory and keeps
its log (timings left out) and the exported weights' hash. Run it in two checkouts on one machine
(the recipe is deterministic there, not across CPUs) and `compare` the two files. It imports the
`dsv32` of the checkout it stands in, and reads the data through the recipe's own stage functions;
for checkouts from before they existed (commit dcf72a9) it falls back to that commit's code path.
The exit status of `compare` covers the data, the training rows of the log and the exported
weights; the held-out diagnostics are reported apart, since those after GRPO can differ in the last
digits between two runs of one checkout (one GRPO update is not bit-reproducible across processes
here: its fp32 weights can differ in the last bits while its logged row and the FP8 export agree).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT

TIMINGS = ("tok_per_s", "rollout_s", "update_s")
BATCHES = 40                     # batches drawn from each stage loader


def digest(rows) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, separators=(",", ":")).encode())
    return h.hexdigest()


def example_rows(examples) -> list:
    return [(e.ids, e.mask, e.category) for e in examples]


def batch_rows(batches) -> list:
    return [(b.ids.tolist(), b.mask.tolist(), b.prefix) for b in batches]


def sample(tok, e) -> dict:
    """One example as text, the trained spans in [[...]] (value tokens in {{...}})."""
    out, marks = [], {0: ("", ""), 1: ("[[", "]]"), 2: ("{{", "}}")}
    for i, m in zip(e.ids, e.mask):
        out.append((m, tok.decode([i])))
    text, cur = "", 0
    for m, piece in out:
        if m != cur:
            text += marks[cur][1] + marks[m][0]
            cur = m
        text += piece
    return {"category": e.category, "tokens": len(e.ids), "text": text + marks[cur][1]}


def stage_data(tok):
    """{"rows": {name: examples}, "loaders": {stage: Loader}, "heldout": batches, "counts": {...}}
    for the default recipe, built by the code under test: its data stage, then each training
    stage's own loader (the stage's training replaced by keeping the loader)."""
    try:
        from dsv32.train import demo
    except ImportError:
        return _stage_data_at_dcf72a9(tok)
    from dsv32.train.recipe import Recipe

    loaders = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = demo.data_stage(Path(tmp), Recipe(), progress=False)
        run.train = lambda sc, loader: loaders.setdefault(sc.name, loader)
        for stage in (demo.short_context_sft, demo.full_prompt_sft, demo.dsa_warmup, demo.dsa_sparse):
            stage(run)
    rows = {"conversations": run.data.examples, **{name: ld.examples for name, ld in loaders.items()}}
    return {"rows": rows, "loaders": loaders, "heldout": run.data.heldout_batches,
            "counts": run.data.counts()}


def _stage_data_at_dcf72a9(tok):
    """The same, from the code of commit dcf72a9 (lines of its `run_demo`)."""
    from dsv32.model.init_tiny import tiny_config
    from dsv32.train import recipe as R
    from dsv32.train.data import Loader, encode_all, without_tools
    from dsv32.train.losses import TiedVocab
    from dsv32.train.synth import sft_conversations

    recipe = R.Recipe()
    convs = R.training_conversations(recipe)
    later = R.later_conversations(recipe)
    stages = (recipe.short, recipe.sft, recipe.warmup, recipe.sparse)
    marks = any(sc.value_weight != 1.0 for sc in stages)
    examples = encode_all(convs + later, tok, max_len=1536, mark_values=marks)
    heldout = encode_all(sft_conversations(recipe.n_heldout_lm, seed=recipe.seed + 1, split="heldout"), tok)
    seen = {i for e in examples for i in e.ids} | {tok.bos_id, tok.eos_id}
    vocab = TiedVocab(sorted(seen), tiny_config(**recipe.model).vocab_size)
    counts = dict(conversations=len(convs) + len(later), examples=len(examples),
                  tokens=sum(len(e.ids) for e in examples),
                  loss_tokens=sum(len(e.mask) - e.mask.count(0) for e in examples),
                  value_tokens=sum(e.mask.count(2) for e in examples), seen_vocab=len(vocab.seen))
    sw, drop = recipe.sort_window, R.word_dropout(tok, vocab, recipe.word_dropout)
    full = R.full_stage_examples(examples, recipe.full_drills, recipe.seed)
    short = encode_all([without_tools(c) for c in convs], tok, max_len=1536, mark_values=marks)
    subsets = R.tool_subset_conversations(convs + later, recipe.sparse_tool_subsets, recipe.seed)
    sparse = examples + encode_all(subsets, tok, max_len=1536, mark_values=marks)
    b, s, u = recipe.batch, recipe.seed, tok.user_id
    loaders = {
        "sft_short": Loader(short, b, seed=s + 3, bucket_id=u, sort_window=sw, dropout=drop),
        "sft": Loader(full, b, seed=s, bucket_id=u, sort_window=sw, dropout=drop),
        "dsa_warmup": Loader(examples, max(4, b // 2), seed=s + 1, bucket_id=u, sort_window=sw),
        "dsa_sparse": Loader(sparse, b, seed=s + 2, bucket_id=u, sort_window=sw, dropout=drop)}
    rows = {"conversations": examples, **{name: ld.examples for name, ld in loaders.items()}}
    return {"rows": rows, "loaders": loaders, "heldout": R._heldout_batches(heldout, b, tok),
            "counts": counts}


def fingerprint_data() -> dict:
    from dsv32.chat import Tokenizer

    tok = Tokenizer.load()
    t0 = time.time()
    got = stage_data(tok)
    out = {"counts": got["counts"], "rows": {}, "epoch_order": {}, "batches": {}, "samples": {}}
    for name, examples in got["rows"].items():
        out["rows"][name] = {"n": len(examples), "sha256": digest(example_rows(examples))}
        picks = (0, len(examples) // 2, len(examples) - 1)
        out["samples"][name] = [sample(tok, examples[i]) for i in picks]
    for name, loader in got["loaders"].items():
        out["epoch_order"][name] = digest(loader._batches())
        out["batches"][name] = digest(batch_rows(loader.next() for _ in range(BATCHES)))
    out["heldout_batches"] = digest(batch_rows(got["heldout"]))
    everything = [out["counts"], out["rows"], out["epoch_order"], out["batches"], out["heldout_batches"]]
    out["data_sha256"] = digest(everything)
    out["data_seconds"] = round(time.time() - t0, 1)
    return out


def short_run(scale: float) -> dict:
    from dsv32.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        main(["train", "--recipe", "demo", "--scale", str(scale), "--no-eval", "--no-progress",
              "--out", tmp])
        log = [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()]
        weights = hashlib.sha256()
        for f in sorted((Path(tmp) / "model").glob("*.safetensors")):
            weights.update(f.read_bytes())
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    log = [{k: v for k, v in row.items() if k not in TIMINGS} for row in log]
    kept = {k: summary[k] for k in ("after_sft", "after_grpo", "grpo", "bundle_bytes") if k in summary}
    return {"scale": scale, "log": log, "summary": kept, "weights_sha256": weights.hexdigest(),
            "run_seconds": round(time.time() - t0, 1)}


def record(path: Path, scale: float, run: bool) -> None:
    out = {"checkout": str(ROOT), "data": fingerprint_data()}
    print(f"data: {out['data']['data_sha256']} ({out['data']['data_seconds']} s)", flush=True)
    if run:
        out["run"] = short_run(scale)
        print(f"run: {len(out['run']['log'])} log rows, weights {out['run']['weights_sha256']}")
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


def compare(a: dict, b: dict) -> bool:
    same = True
    da, db = a["data"], b["data"]
    print(f"data hash: {da['data_sha256'][:16]} vs {db['data_sha256'][:16]}:",
          "identical" if da["data_sha256"] == db["data_sha256"] else "DIFFERENT")
    same &= da["data_sha256"] == db["data_sha256"]
    for part in ("counts", "rows", "epoch_order", "batches", "heldout_batches", "samples"):
        if da[part] != db[part]:
            print(f"  {part} differ")
    if "run" not in a or "run" not in b:
        return same
    la, lb = a["run"]["log"], b["run"]["log"]
    trained = lambda log: [r for r in log if "stage" in r]                      # noqa: E731
    evals = lambda log: [r for r in log if r.get("event") == "lm_eval"]         # noqa: E731
    equal = trained(la) == trained(lb)
    print(f"logged training rows: {len(trained(la))} vs {len(trained(lb))}:",
          "identical line for line" if equal else "DIFFERENT")
    for ra, rb in zip(trained(la), trained(lb)):
        if ra != rb:
            print(f"  first difference:\n    {ra}\n    {rb}")
            break
    for ra, rb in zip(evals(la), evals(lb)):
        diff = {k: (ra[k], rb.get(k)) for k in ra if ra[k] != rb.get(k)}
        worst = max((abs(x - y) / max(abs(x), 1e-12) for x, y in diff.values()
                     if isinstance(x, float) and isinstance(y, float)), default=0.0)
        print(f"held-out diagnostics {ra['tag']}:", "identical" if not diff else
              f"{len(diff)} of {len(ra) - 2} values differ, by at most {worst:.1e} relative: {diff}")
    events = lambda log: [r for r in log if "stage" not in r and r.get("event") != "lm_eval"]  # noqa: E731
    if events(la) != events(lb):
        print("other log rows (events) differ:")
        print("   before:", events(la))
        print("   after: ", events(lb))
    weights = a["run"]["weights_sha256"] == b["run"]["weights_sha256"]
    print("exported weights:", "identical" if weights else "DIFFERENT")
    print("summary (diagnostics, GRPO rewards, bundle size):",
          "identical" if a["run"]["summary"] == b["run"]["summary"] else "DIFFERENT")
    return same and equal and weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    r.add_argument("--scale", type=float, default=0.02)
    r.add_argument("--no-run", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = ap.parse_args()
    if args.cmd == "record":
        record(args.out, args.scale, not args.no_run)
    else:
        ok = compare(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
