"""Generation throughput at batch 1..32 on the common benchmark model, with and without prefix hits.

    python bench/throughput.py [--batches 1 2 4 8 16 32] [--prompt 512] [--shared 448]
                               [--tokens 64] [--weight-format fp32] [--model DIR] [--write-readme]

Each request has a `--prompt`-token prompt whose first `--shared` tokens are common to all
requests; "prefix hits" warms the prefix cache with one earlier request, "cold" disables prefix
caching. Decode tokens/s counts the steps after every prompt is prefilled; end-to-end counts
all output tokens over the whole run (prefill included).
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from common import bench_model_dir, machine, markdown_table, write_section

HEADING = "## Throughput (bench/throughput.py)"


def run(model, tok, path, B: int, prompt_len: int, shared: int, tokens: int, prefix: bool, fmt: str) -> dict:
    from dsv32.engine.engine import EngineConfig, LLMEngine
    from dsv32.engine.sequence import SamplingParams
    eng = LLMEngine(EngineConfig(model=str(path), max_model_len=prompt_len + tokens + 64, max_num_seqs=B,
                                 max_num_batched_tokens=4096, enable_prefix_caching=prefix, weight_format=fmt),
                    model=model, tokenizer=tok)
    g = torch.Generator().manual_seed(B)
    common = torch.randint(1000, 100000, (shared,), generator=g).tolist()
    tail = lambda: torch.randint(1000, 100000, (prompt_len - shared,), generator=g).tolist()  # noqa: E731
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    if prefix:                                   # warm the prefix cache
        eng.add_request("warm", common + tail(), SamplingParams(temperature=0.0, max_tokens=1))
        for _ in eng.steps():
            pass
    for i in range(B):
        eng.add_request(f"r{i}", common + tail(), params)
    t0 = time.perf_counter()
    t_decode, produced, hits = None, 0, 0
    for outputs in eng.steps():
        for out in outputs:
            if out.finished:
                hits += out.num_cached_tokens
        running = eng.scheduler.running
        if t_decode is None and not eng.scheduler.waiting and all(s.num_output_tokens >= 1 for s in running):
            t_decode, produced = time.perf_counter(), sum(s.num_output_tokens for s in running)
    end = time.perf_counter()
    return {"e2e": B * tokens / (end - t0), "decode": (B * tokens - produced) / (end - t_decode),
            "hit": hits / B}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--shared", type=int, default=448)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--weight-format", default="fp32", choices=["fp32", "bf16", "fp16", "int8"])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the common benchmark model)")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()

    from dsv32.chat import Tokenizer
    from dsv32.model.checkpoint import load_model
    path = args.model or bench_model_dir()
    model, tok = load_model(path, weight_format=args.weight_format, progress=False), Tokenizer.load(path)
    for B in sorted({1, 2, max(args.batches)}):  # compile the decode graphs (one row, any batch) untimed: small
        run(model, tok, path, B, 64, 0, 4, False, args.weight_format)    # batches may not use them
    rows, base = [], None
    for B in tqdm(args.batches, desc="batch sizes"):
        cold = run(model, tok, path, B, args.prompt, args.shared, args.tokens, False, args.weight_format)
        warm = run(model, tok, path, B, args.prompt, args.shared, args.tokens, True, args.weight_format)
        base = base or cold["decode"]
        rows.append([B, f"{cold['decode']:.1f}", f"{cold['decode'] / base:.1f}x", f"{cold['e2e']:.1f}",
                     f"{warm['e2e']:.1f}", f"{warm['e2e'] / cold['e2e']:.2f}x", f"{warm['hit']:.0f}"])
        tqdm.write(str(rows[-1]))
    table = markdown_table(["batch", "decode tok/s (cold)", "vs batch 1", "end-to-end tok/s (cold)",
                            "end-to-end tok/s (prefix hits)", "hit speed-up", "cached prompt tokens/req"],
                           rows)
    print(table)
    if args.write_readme:
        write_section(HEADING, f"{'Common benchmark model' if args.model is None else args.model}, "
                               f"{args.weight_format}, {args.prompt}-token prompts sharing "
                               f"{args.shared} tokens, {args.tokens} output tokens each; {machine()}.\n\n{table}")


if __name__ == "__main__":
    main()
