"""Bit-for-bit determinism of the training recipe's numbers across a refactor of the forward.

    python bench/train_determinism.py --out /tmp/after.txt [--compare /tmp/before.txt]

Runs a tiny model through every stage the recipe runs, with the trainer's own entry points:
SFT (dense attention, MTP loss, balance loss, aux-loss-free bias updates, tool-value weights,
indexer recall measured) on shared-prefix batches and on packed rows, the DSA warm-up and the
sparse stage on both, GRPO steps (engine rollouts, Keep Routing replay, Keep Sampling Mask, KL to
a frozen reference) and the held-out dense / sparse evaluation. Every logged number is printed
with `float.hex`, and a checksum of the weights after each stage, so two checkouts can be compared
exactly (`--compare`). One thread, so the arithmetic does not depend on the machine's load.
Takes a few minutes on a CPU.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout this file is in

USER = 3          # the token that ends a row's shared prefix (the Loader's bucket id)
CFG_DIMS = dict(layers=2, hidden=64, heads=4, q_lora=32, kv_lora=32, nope=16, rope=16, v=16,
                inter=96, moe_inter=32, experts=8, groups=4, topk_group=2, active=2,
                index_heads=16, index_dim=32, topk=8, dense=1, vocab=300)


def examples(n: int, seed: int):
    """Copy drills behind one of two 40-token system prompts; the copied numbers weigh as values."""
    from dsv32.train.data import Example
    g = torch.Generator().manual_seed(seed)
    systems = [[0] + torch.randint(10, 200, (39,), generator=g).tolist() for _ in range(2)]
    out = []
    for i in range(n):
        a = torch.randint(10, 200, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        ids = systems[i % 2] + [USER] + a + [2] + a + [1]
        mask = [0] * (42 + len(a)) + [2] + [1] * len(a)      # first copied token: a "value"
        out.append(Example(ids, mask))
    return out


class Cycle:
    """A loader over fixed batches (packed rows), in order."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


def checksum(model) -> str:
    """SHA-256 of every weight's bytes (exact: one flipped bit changes it)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def emit(lines: list[str], tag: str, row: dict) -> None:
    for k in sorted(row):
        v = row[k]
        if isinstance(v, dict):
            for kk in sorted(v):
                lines.append(f"{tag} {k}[{kk}] {float(v[kk]).hex()}")
        elif isinstance(v, (int, float)) and k not in ("tok_per_s", "rollout_s", "update_s"):
            lines.append(f"{tag} {k} {float(v).hex()}")


def lm_stages(model, vocab, lines: list[str], steps: int, log) -> None:
    from dsv32.train.data import Loader, pack
    from dsv32.train.trainer import StageConfig, train_stage

    shared = Loader(examples(96, 1), 6, seed=0, bucket_id=USER)
    packed = Cycle(pack(examples(48, 2), 96))
    stages = [StageConfig(name="sft", stage="dense", steps=steps, lr=3e-3, warmup=2, mtp_weight=0.3,
                          value_weight=5.0, measure_recall=True, log_every=1),
              StageConfig(name="warmup", stage="warmup", steps=steps, lr=1e-3, warmup=1,
                          mtp_weight=0.0, log_every=1),
              StageConfig(name="sparse", stage="sparse", steps=steps, lr=5e-4, indexer_lr=1e-3,
                          warmup=1, mtp_weight=0.1, log_every=1)]
    for sc in stages:
        for name, loader in (("shared", shared), ("packed", packed)):
            rows = train_stage(model, loader, sc, log, progress=False, vocab=vocab)
            for r in rows:
                emit(lines, f"{sc.name}/{name}/{r['step']}", r)
            lines.append(f"{sc.name}/{name} weights {checksum(model)}")


def grpo_steps(model, lines: list[str], steps: int) -> None:
    from dsv32.chat import Tokenizer
    from dsv32.train import grpo as G
    from dsv32.train.trainer import StageConfig, make_optimizer, set_trainable

    gc = G.GRPOConfig(group_size=4, max_tokens=8, lr=1e-3, beta=0.01, top_p=0.9, top_k=20)
    set_trainable(model, "sparse")
    ref = G.frozen_copy(model)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad],
                         StageConfig(name="grpo", lr=gc.lr))
    engine = G.make_engine(model, Tokenizer.load(), max_seqs=16)
    sys_a = examples(2, 1)[0].ids[:41]
    prompts = [sys_a + list(range(20, 20 + n)) for n in (5, 9)]
    for step in range(steps):
        model.eval()
        groups = G.rollout(engine, prompts, gc, seed=step)
        for group in groups:
            for r in group:       # a deterministic reward: tokens below 100 are "right"
                r.reward = sum(t < 100 for t in r.completion_ids) / max(1, len(r.completion_ids))
                lines.append(f"grpo/{step}/rollout {r.completion_ids} "
                             + " ".join(float(x).hex() for x in r.logp_old))
        model.train()
        emit(lines, f"grpo/{step}", G.grpo_update(model, ref, opt, groups, gc))
        lines.append(f"grpo/{step} weights {checksum(model)}")
    set_trainable(model, "dense")


def evaluation(model, lines: list[str]) -> None:
    from dsv32.train.data import collate, pack
    from dsv32.train.trainer import eval_lm

    ex = examples(12, 3)
    batches = [collate(ex[i: i + 6]) for i in (0, 6)] + pack(ex, 96)
    for stage in ("dense", "sparse"):
        emit(lines, f"eval/{stage}", eval_lm(model, batches, stage))


def run(steps: int, grpo: int) -> list[str]:
    from dsv32.model.init_tiny import tiny_config
    from dsv32.train.losses import TiedVocab
    from dsv32.train.trainer import JsonLog, new_model
    import tempfile

    torch.manual_seed(0)
    cfg = tiny_config(**CFG_DIMS)
    model = new_model(cfg, seed=0, std=0.02, tie_embeddings=True)
    vocab = TiedVocab(sorted({i for e in examples(96, 1) + examples(48, 2) for i in e.ids}), cfg.vocab_size)
    vocab.sync(model.lm_head.weight.data)
    lines = [f"init weights {checksum(model)}"]
    with tempfile.TemporaryDirectory() as tmp:
        lm_stages(model, vocab, lines, steps, JsonLog(Path(tmp) / "log.jsonl"))
    grpo_steps(model, lines, grpo)
    evaluation(model, lines)
    return lines


def compare(got: list[str], ref_path: Path) -> int:
    ref = ref_path.read_text().splitlines()
    same = sum(a == b for a, b in zip(got, ref))
    print(f"{same} of {len(ref)} reference lines identical ({len(got)} lines now)")
    for a, b in zip(got, ref):
        if a != b:
            print(f"first difference:\n  ref: {b}\n  now: {a}")
            return 1
    return 0 if len(got) == len(ref) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="steps per stage and batch shape")
    ap.add_argument("--grpo", type=int, default=3, help="GRPO steps")
    ap.add_argument("--out", type=Path, help="write the numbers here")
    ap.add_argument("--compare", type=Path, help="a reference output to compare with, line by line")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    lines = run(args.steps, args.grpo)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} numbers")
    return compare(lines, args.compare) if args.compare else 0


if __name__ == "__main__":
    sys.exit(main())
