"""Where one decode step goes: wall time per part of `LLMEngine.step` at one context depth.

    python bench/decode_parts.py [--formats fp32 int8] [--depth 1024] [--steps 64] [--write-readme]

Batch 1 on the common benchmark model, the cache holding depth-1 tokens of random latents and
indexer keys (decode_longctx.engine_at_depth: no prefill spent). Each part is timed by a wrapper
around the function that computes it (the wrappers cost ~1 us a call); the parts nest, so a row
includes the rows under it with one more dot. A benchmark, not a test: it never runs in CI.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import subprocess
import sys
import time

from common import bench_model_dir, machine, markdown_table, write_section
from decode_longctx import engine_at_depth

HEADING = "## Decode step, part by part (bench/decode_parts.py)"

# (depth in the table, label, owner, attribute): what is timed, in the order of the table
PARTS = [
    (0, "engine step", "dsv32.engine.engine:LLMEngine", "step"),
    (1, "runner: inputs", "dsv32.engine.runner:ModelRunner", "prepare"),
    (1, "model forward", "dsv32.engine.executor:Executor", "compute"),
    (2, "cache view (PagedKV)", "dsv32.engine.cache:PagedKV", "__init__"),
    (2, "token embeddings", "dsv32.model.layers:VocabParallelEmbedding", "forward"),
    (2, "rope cos / sin", "dsv32.model.layers:Rotary", "forward"),
    (2, "blocks", "dsv32.model.decode", "step"),
    (2, "blocks, eager", "dsv32.model.block:Block", "reference"),
    (3, "native row: norms, projections, ropes, absorbed q, cache write, indexer top-k, sparse attention",
     "dsv32.model.cpu.layer:NativeLayer", "attention"),
    (3, "native row: W_uv, o_proj, residuals, MLP or MoE (router, shared and chosen experts)",
     "dsv32.model.cpu.layer:NativeLayer", "ffn"),
    (3, "compiled: norms, projections, rope, absorbed q", "kernel", "_attn_in"),
    (3, "cache writes", "dsv32.engine.cache:PagedKV", "write"),
    (3, "indexer scores + top-k", "dsv32.model.attention:MLA", "decode_select"),
    (3, "sparse attention over the gathered latents", "dsv32.model.attention:MLA", "attend_latent"),
    (3, "attention of each row (native: cache write, indexer top-k, sparse attention)", "dsv32.model.decode", "_attention_rows"),
    (3, "compiled: W_uv, o_proj, MLP", "kernel", "_attn_out"),
    (3, "compiled: W_uv, o_proj, router, shared expert", "kernel", "_attn_out_moe"),
    (3, "routed experts", "dsv32.model.moe:MoE", "routed"),
    (3, "routed experts of one row", "dsv32.model.decode", "_routed_row"),
    (2, "final norm (native)", "dsv32.model.decode", "norm"),
    (2, "LM head", "dsv32.model.transformer:Transformer", "logits"),
    (1, "sampling", "dsv32.engine.engine:LLMEngine", "_sample"),
    (1, "detokenise, stops, outputs", "dsv32.engine.engine:LLMEngine", "_postprocess"),
]


class Timers:
    """Wall-time totals per label, filled by wrappers installed for the run."""

    def __init__(self):
        self.seconds, self.calls = collections.Counter(), collections.Counter()

    def timed(self, label: str, f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1
        return wrapper

    def install(self) -> None:
        import importlib

        from dsv32.model import decode
        kernels = {name: label for _, label, owner, name in PARTS if owner == "kernel"}
        build = decode.kernel

        def kernel(fn, *key):
            g = build(fn, *key)
            return self.timed(kernels[fn.__name__], g) if fn.__name__ in kernels else g
        decode.kernel = kernel
        for _, label, owner, name in PARTS:
            if owner == "kernel":
                continue
            module, _, cls = owner.partition(":")
            obj = importlib.import_module(module)
            obj = getattr(obj, cls) if cls else obj
            setattr(obj, name, self.timed(label, getattr(obj, name)))


def run(fmt: str, depth: int, steps: int, path) -> tuple[float, dict[str, tuple[float, float]]]:
    """ms per step and {label: (ms per step, calls per step)} for one weight format."""
    from dsv32.chat import Tokenizer
    from dsv32.model.checkpoint import load_model

    timers = Timers()
    timers.install()
    model, tok = load_model(path, weight_format=fmt, progress=False), Tokenizer.load(path)
    eng = engine_at_depth(model, tok, path, depth, steps + 6)
    for _ in range(6):                           # last prompt token, then compiles and warm-up
        eng.step()
    timers.seconds.clear()
    timers.calls.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    total = (time.perf_counter() - t0) / steps * 1e3
    return total, {k: (v / steps * 1e3, timers.calls[k] / steps) for k, v in timers.seconds.items()}


def child(fmt: str, depth: int, steps: int, path) -> None:
    total, parts = run(fmt, depth, steps, path)
    print(json.dumps({"total": total, "parts": parts}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="+", default=["fp32", "int8"])
    ap.add_argument("--depth", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the common benchmark model)")
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.depth, args.steps, args.model or bench_model_dir())
    results = {}
    for fmt in args.formats:                     # each format in a fresh process (wrappers, compiles)
        out = subprocess.run([sys.executable, __file__, "--child", fmt, "--depth", str(args.depth),
                              "--steps", str(args.steps)]
                             + (["--model", args.model] if args.model else []), check=True, capture_output=True, text=True).stdout
        results[fmt] = json.loads(out.strip().splitlines()[-1])
    rows = []
    for level, label, _, _ in PARTS:
        cells = [results[f]["parts"].get(label) for f in args.formats]
        if not any(cells):
            continue
        rows.append(["· " * level + label] +
                    [f"{c[0]:.3f} ({c[1]:g}x)" if c else "-" for c in cells])
    table = markdown_table(["part", *(f"{f}: ms per step (calls)" for f in args.formats)], rows)
    totals = ", ".join(f"{f} {results[f]['total']:.2f} ms" for f in args.formats)
    print(table)
    print(f"whole step: {totals}")
    if args.write_readme:
        write_section(HEADING, f"Common benchmark model, batch 1, depth {args.depth}, greedy, {args.steps} "
                               f"steps timed; {machine()}. Rows nest (a row includes the rows under it "
                               f"with one more dot); the wrappers add about 1 us a call.\n\n    python "
                               f"bench/decode_parts.py --write-readme\n\n{table}\n\nWhole step: {totals}.")


if __name__ == "__main__":
    main()
