"""Prefill throughput and peak memory up to 128K-token prompts on the common benchmark model.

    python bench/prefill.py [--lengths 1024 4096 16384 32768 65536 131072] [--chunk 512]
                            [--weight-format fp32] [--write-readme]

Each length runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own: the engine prefills
the prompt in chunks of `--chunk` tokens (chunked prefill, sparse attention over index_topk=256
gathered entries once the context exceeds it) and decodes one token.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import bench_model_dir, machine, markdown_table, peak_rss_bytes, write_section

HEADING = "## Prefill (bench/prefill.py)"


def child(L: int, chunk: int, fmt: str) -> None:
    import torch

    from dsv32.engine.engine import EngineConfig, LLMEngine
    from dsv32.engine.sequence import SamplingParams
    path = bench_model_dir()
    eng = LLMEngine(EngineConfig(model=str(path), max_model_len=L + 64, max_num_seqs=1,
                                 max_num_batched_tokens=chunk, enable_prefix_caching=False, weight_format=fmt))
    base = peak_rss_bytes()
    # warm-up (first-call costs of the kernels, compiling the packed-weight ones) outside the timing
    eng.add_request("w", list(range(1000, 1064)), SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    prompt = torch.randint(1000, 100000, (L,)).tolist()
    eng.add_request("p", prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    t0 = time.perf_counter()
    for _ in eng.steps():
        pass
    dt = time.perf_counter() - t0
    cache = sum(t.numel() * t.element_size() for t in vars(eng.executor.cache).values() if isinstance(t, torch.Tensor))
    print(json.dumps({"seconds": dt, "peak_rss": peak_rss_bytes(), "after_load_rss": base,
                      "cache_bytes": cache}))


def indexer_flops(cfg, L: int, chunk: int) -> float:
    """FLOPs of the lightning indexer's scores in a chunked prefill of L tokens (main layers;
    each chunk scores its queries against every key up to its end), only once index_topk is
    exceeded (before, every key is selected unscored)."""
    per_pair = 2 * cfg.index_n_heads * cfg.index_head_dim
    pairs = sum(min(chunk, L - s) * (min(L, s + chunk)) for s in range(0, L, chunk) if s + chunk > cfg.index_topk)
    return pairs * per_pair * cfg.num_hidden_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536, 131072])
    ap.add_argument("--chunk", type=int, default=512)   # the CPU engine's default step
    ap.add_argument("--weight-format", default="fp32", choices=["fp32", "bf16", "fp16", "int8", "fp8"])
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.chunk, args.weight_format)
    from dsv32.model.config import ModelConfig
    from weight_kernels import gemm_gflops
    cfg = ModelConfig.from_json(bench_model_dir())
    gflops = gemm_gflops()
    rows = []
    for L in args.lengths:
        out = subprocess.run([sys.executable, __file__, "--child", str(L), "--chunk", str(args.chunk),
                              "--weight-format", args.weight_format],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            rows.append([L, "failed", "", "", "", "", ""])
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        gb = 1 << 30
        bound = indexer_flops(cfg, L, args.chunk) / gflops / 1e9
        rows.append([L, f"{r['seconds']:.1f}", f"{L / r['seconds']:.0f}", f"{r['cache_bytes'] / gb:.2f}",
                     f"{r['peak_rss'] / gb:.2f}", f"{bound:.1f}", f"{r['seconds'] / bound:.1f}x"])
        print(rows[-1], flush=True)
    table = markdown_table(["prompt tokens", "seconds", "tokens/s", "KV cache GiB", "peak RSS GiB",
                            "indexer bound s", "seconds / bound"], rows)
    print(table)
    if args.write_readme:
        write_section(HEADING, f"Common benchmark model, {args.weight_format} weights, chunked prefill of {args.chunk} tokens; "
                               f"indexer bound = the indexer's score FLOPs / {gflops:.0f} GFLOP/s (fp32 GEMM on its "
                               f"block shape, bench/weight_kernels.py), "
                               f"each length in a fresh process; {machine()}.\n\n{table}")


if __name__ == "__main__":
    main()
