"""Prefill throughput and peak memory up to 128K-token prompts on the common benchmark model.

    python bench/prefill.py [--lengths 1024 4096 16384 32768 65536 131072] [--chunk 2048]
                            [--write-readme]

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


def child(L: int, chunk: int) -> None:
    import torch

    from dsv32.engine.engine import EngineConfig, LLMEngine
    from dsv32.engine.sequence import SamplingParams
    path = bench_model_dir()
    eng = LLMEngine(EngineConfig(model=str(path), max_model_len=L + 64, max_num_seqs=1,
                                 max_num_batched_tokens=chunk, enable_prefix_caching=False))
    base = peak_rss_bytes()
    prompt = torch.randint(1000, 100000, (L,)).tolist()
    eng.add_request("p", prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    t0 = time.perf_counter()
    for _ in eng.steps():
        pass
    dt = time.perf_counter() - t0
    cache = sum(t.numel() * t.element_size() for t in vars(eng.executor.cache).values() if isinstance(t, torch.Tensor))
    print(json.dumps({"seconds": dt, "peak_rss": peak_rss_bytes(), "after_load_rss": base,
                      "cache_bytes": cache}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536, 131072])
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.chunk)
    bench_model_dir()
    rows = []
    for L in args.lengths:
        out = subprocess.run([sys.executable, __file__, "--child", str(L), "--chunk", str(args.chunk)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            rows.append([L, "failed", "", "", ""])
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        gb = 1 << 30
        rows.append([L, f"{r['seconds']:.1f}", f"{L / r['seconds']:.0f}", f"{r['cache_bytes'] / gb:.2f}",
                     f"{r['peak_rss'] / gb:.2f}"])
        print(rows[-1], flush=True)
    table = markdown_table(["prompt tokens", "seconds", "tokens/s", "KV cache GiB", "peak RSS GiB"], rows)
    print(table)
    if args.write_readme:
        write_section(HEADING, f"Common benchmark model, fp32, chunked prefill of {args.chunk} tokens, "
                               f"each length in a fresh process; {machine()}.\n\n{table}")


if __name__ == "__main__":
    main()
