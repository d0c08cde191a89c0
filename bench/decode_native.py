"""One decode row's block as two native calls (model/cpu/layer.py) against the compiled graphs it
replaced (model/decode.py's path for several rows), on the same engine, alternating in one process.

    python bench/decode_native.py [--model bench] [--formats int8 bf16 fp16 fp32] [--depth 1024]
                                  [--steps 100] [--rounds 3]

Batch 1, greedy, the cache holding depth-1 random keys (decode_longctx.engine_at_depth). Each round
times both arms back to back (the graphs' arm refuses the native row for every block), the best
round of each kept: this host's speed drifts by minutes, and the ratio stays fair only when both
arms see the same minutes. A benchmark, not a test: it never runs in CI.
"""
from __future__ import annotations

import argparse
import time

from common import machine, markdown_table, model_dir
from decode_longctx import engine_at_depth


def arms(fmt: str, path, depth: int, steps: int, rounds: int) -> dict[str, float]:
    """{"graphs", "native"}: the best ms per step over `rounds` alternating rounds."""
    from dsv32.chat import Tokenizer
    from dsv32.model import decode
    from dsv32.model.checkpoint import load_model
    from dsv32.model.cpu.layer import NativeLayer

    model, tok = load_model(path, weight_format=fmt, progress=False), Tokenizer.load(path)
    fits = NativeLayer.fits
    best = {"graphs": float("inf"), "native": float("inf")}
    try:
        for _ in range(rounds):
            for arm in best:
                NativeLayer.fits = staticmethod(fits if arm == "native" else lambda block: None)
                decode._native_layers.clear()
                eng = engine_at_depth(model, tok, path, depth, steps + 8)
                for _ in range(6):               # last prompt token, then builds and warm-up
                    eng.step()
                t0 = time.perf_counter()
                for _ in range(steps):
                    eng.step()
                best[arm] = min(best[arm], (time.perf_counter() - t0) / steps * 1e3)
                eng.abort_request("d")
    finally:
        NativeLayer.fits = staticmethod(fits)
        decode._native_layers.clear()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bench", choices=["bench", "wide"])
    ap.add_argument("--formats", nargs="+", default=["int8", "bf16", "fp16", "fp32"])
    ap.add_argument("--depth", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    path = model_dir(args.model)
    rows = []
    for fmt in args.formats:
        t = arms(fmt, path, args.depth, args.steps, args.rounds)
        rows.append([fmt, f"{t['graphs']:.2f}", f"{t['native']:.2f}", f"{t['graphs'] / t['native']:.2f}x"])
    print(f"{args.model} model, batch 1, depth {args.depth}, best of {args.rounds} alternating rounds of "
          f"{args.steps} steps; {machine()}\n")
    print(markdown_table(["weights", "graphs ms/step", "native row ms/step", "speed-up"], rows))


if __name__ == "__main__":
    main()
