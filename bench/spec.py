"""MTP speculative decoding against plain decoding, back to back on the same prompts.

    python bench/spec.py [--model DIR] [--batches 1 8] [--prompts 16] [--tokens 128] [--write-readme]

Prompts are held-out tool-use tasks rendered with the chat template (the bundled model's MTP layer
was trained on this kind of text). Greedy decoding; the script checks that both runs give the
same tokens. Reports decode steps per generated token, draft acceptance and tokens/s.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

from common import ROOT, machine, markdown_table, write_section

HEADING = "## MTP speculative decoding (bench/spec.py)"


def run(model, tok, path: str, prompts: list[str], batch: int, tokens: int, spec: int) -> dict:
    from dsv32.engine.engine import EngineConfig, LLMEngine
    from dsv32.engine.sequence import SamplingParams
    eng = LLMEngine(EngineConfig(model=path, max_model_len=2048, max_num_seqs=batch,
                                 num_speculative_tokens=spec), model=model, tokenizer=tok)
    params = SamplingParams(temperature=0.0, max_tokens=tokens)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    outs, steps, t0 = {}, 0, time.perf_counter()
    for step_outputs in eng.steps():
        steps += 1
        for o in step_outputs:
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    wall = time.perf_counter() - t0
    m = eng.metrics()
    n = sum(map(len, outs.values()))
    return {"tokens": [outs[f"r{i}"] for i in range(len(prompts))], "n": n, "steps": steps, "wall": wall,
            "drafts": m["spec_draft_tokens"], "accepted": m["spec_accepted_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()

    from dsv32.chat import Tokenizer, encode_messages
    from dsv32.model.checkpoint import load_model
    from dsv32.server.cli import default_model
    from dsv32.train.evaluate import evaluation_tasks
    path = str(args.model or default_model())
    model, tok = load_model(path, progress=False), Tokenizer.load(path)
    tasks = evaluation_tasks(args.prompts, seed=5)
    prompts = [encode_messages(t.messages, thinking_mode=t.thinking_mode) for t in tasks]
    rows = []
    for B in tqdm(args.batches, desc="batch sizes"):
        plain = run(model, tok, path, prompts, B, args.tokens, 0)
        spec = run(model, tok, path, prompts, B, args.tokens, 1)
        assert plain["tokens"] == spec["tokens"], "speculation changed the greedy tokens"
        rows.append([B, plain["n"], f"{plain['steps']}", f"{spec['steps']}",
                     f"{spec['accepted'] / max(spec['drafts'], 1):.0%}",
                     f"{plain['n'] / plain['wall']:.0f}", f"{spec['n'] / spec['wall']:.0f}",
                     f"{plain['wall'] / spec['wall']:.2f}x"])
        tqdm.write(str(rows[-1]))
    table = markdown_table(["batch", "tokens", "engine steps, plain", "engine steps, MTP", "drafts accepted",
                            "tok/s plain", "tok/s MTP", "speed-up"], rows)
    print(table)
    if args.write_readme:
        resolved = Path(path).resolve()
        shown = resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else path
        write_section(HEADING, f"Model `{shown}` ({model.config.num_hidden_layers} layers, hidden "
                               f"{model.config.hidden_size}), {len(prompts)} held-out tool-use prompts, greedy, "
                               f"up to {args.tokens} tokens; {machine()}. Both runs give identical tokens (checked).\n\n"
                               + table)


if __name__ == "__main__":
    main()
