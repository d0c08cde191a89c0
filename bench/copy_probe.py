"""Teacher-forced copy probe: does a model quote a three-digit tool result it was just given?

    python bench/copy_probe.py [DIR ...] [--attention served|dense] [--numbers 120]

Four held-out calculator conversations, each with its tool result replaced by `--numbers` random
three-digit numbers in turn; the score is the model's top-1 at the answer token that quotes the
number. `dense` runs full causal attention (checkpoints before the DSA stages), `served` the model
as the engine runs it. docs/training.md (runs demo29-demo33) has what it found: the sparse stage
at a high rate took demo23 from 100% to 94%.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from common import ROOT, markdown_table


def copy_top1(path: str, attention: str, numbers: int) -> tuple[float, int]:
    import dsv32
    from dsv32.chat import Tokenizer
    from dsv32.train.data import encode_conversation
    from dsv32.train.dsa import forward as dense_forward
    from dsv32.train.synth import generate_tasks

    tok = Tokenizer.load()
    model = dsv32.load_model(path, progress=False)
    tasks = [t for t in generate_tasks(400, seed=5, split="heldout") if t.category == "calculator"][:4]
    rng = random.Random(0)
    cases = [(t.conversation(), n) for t in tasks for n in rng.sample(range(100, 1000), numbers)]
    hits = total = 0
    for conv, n in tqdm(cases, desc=Path(path).name, leave=False):
        at = next(i for i, m in enumerate(conv.messages) if m["role"] == "tool")
        messages = json.loads(json.dumps(conv.messages).replace(conv.messages[at]["content"], str(n)))
        c = dataclasses.replace(conv, messages=messages[: at + 2])   # up to the answer that quotes it
        ids, mask = encode_conversation(c, tok)
        (nid,) = tok.encode(str(n))
        pos = [i for i, t in enumerate(ids) if t == nid and mask[i]]
        x = torch.tensor([ids])
        with torch.no_grad():
            h = dense_forward(model, x, stage="dense", mtp=False)[0] if attention == "dense" else model.hidden(x)
            pred = model.logits(h[0, [p - 1 for p in pos]]).argmax(-1)
        hits += int((pred == nid).sum())
        total += len(pos)
    return hits / max(total, 1), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", default=[str(ROOT / "dsv32" / "assets" / "model")])
    ap.add_argument("--attention", choices=("served", "dense"), default="served")
    ap.add_argument("--numbers", type=int, default=120)
    args = ap.parse_args()
    rows = []
    for d in args.dirs:
        acc, n = copy_top1(d, args.attention, args.numbers)
        rows.append([d, args.attention, n, f"{100 * acc:.1f}%"])
    print(markdown_table(["model", "attention", "copies", "top-1"], rows))


if __name__ == "__main__":
    main()
