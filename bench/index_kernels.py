"""The indexer over an FP8 cache: its vector code against AMX tiles, in decode and in prefill.

Decode: one row's attention (native.decode_attention: the indexer's scores over every key, their
top-k, the sparse attention over 256 rows) per layer at depth, the scores on the AVX-512 code
(dequantise, fp32 FMAs) and on AMX tiles (amx_index.cpp), alternating; and over a bf16 cache
(`--kv-cache-dtype bfloat16`) on AMX tiles in the same rounds. Prefill: a chunk's scores
(cpu/indexer.index_scores) over fp32 keys (GEMM + head sums) and over FP8 and bf16 keys on AMX
tiles (amx_index_rows.cpp, 16+ heads), alternating.

    python bench/index_kernels.py [--depths 1024 8192 32768 65536] [--index-heads 8 64] [--write-readme]

Index heads 8: the common benchmark model; 64: DeepSeek-V3.2's. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import machine, markdown_table, write_section

HEADING = "## Indexer kernels (bench/index_kernels.py)"


def pools(S: int, block: int = 64, C: int = 512, R: int = 64, Di: int = 128):
    """FP8 pools holding S random keys in shuffled blocks (engine/cache.py's layout)."""
    from dsv32.model.fp8 import quantize_groups
    from dsv32.model.cpu.pages import Pages
    nb = -(-S // block)
    lat, lat_scale = quantize_groups(torch.randn(nb * block, C))
    ik, ik_scale = quantize_groups(torch.randn(nb * block, Di))
    rope = torch.randn(nb * block, R).to(torch.bfloat16)
    return Pages(lat, ik, torch.randperm(nb), block, lat_scale, rope, ik_scale)


def per_layer_us(S: int, Hi: int, rounds: int, H: int = 4, C: int = 512, R: int = 64) -> dict:
    """Best-of-rounds microseconds a call: FP8 pools on AVX-512 and on AMX, bf16 pools on AMX, in turn."""
    from dsv32.model.cpu import native
    fp8 = pools(S)
    nb = fp8.table.numel()
    half = fp8._replace(latent=torch.randn(nb * fp8.block, C + R).to(torch.bfloat16), latent_scale=None, rope=None,
                        index=torch.randn(nb * fp8.block, 128).to(torch.bfloat16), index_scale=None)
    args = (torch.randn(C + R), torch.randn(128), torch.randn(H, C + R), torch.randn(Hi, 128), torch.randn(Hi))
    runs = {"fp8 512": (fp8, 512), "fp8 amx": (fp8, native.AMX), "bf16 amx": (half, native.AMX)}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, (pages, isa) in runs.items():
            t0 = time.perf_counter()
            for _ in range(10):
                native.decode_attention(*args, pages, S, 256, 0.1, C, isa)
            best[name] = min(best[name], (time.perf_counter() - t0) / 10 * 1e6)
    return best


def prefill_ms(t: int, H: int, n: int, rounds: int) -> list[float]:
    """Best-of-rounds ms of cpu/indexer.index_scores for t queries over n consecutive keys: fp32
    keys (GEMM + head sums), FP8 keys and bf16 keys (on AMX tiles with 16+ heads), in turn."""
    from dsv32.model.fp8 import dequantize_groups, quantize_groups
    from dsv32.model.cpu.indexer import FP8Keys, index_scores
    values, scales = quantize_groups(torch.randn(n, 128))
    fp32 = dequantize_groups(values, scales, torch.float32)
    runs = [[(0, fp32)], [(0, FP8Keys(values, scales))], [(0, fp32.to(torch.bfloat16))]]
    q, w = torch.randn(t, H, 128), torch.randn(t, H)
    best = [float("inf")] * 3
    for _ in range(rounds):
        for i, run in enumerate(runs):
            t0 = time.perf_counter()
            index_scores(q, w, run, n)
            best[i] = min(best[i], (time.perf_counter() - t0) * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[1024, 8192, 32768, 65536])
    ap.add_argument("--index-heads", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    from dsv32.model.cpu import native
    if not native._amx_index_ready():
        raise SystemExit("this CPU (or Linux, for this process) has no AMX-BF16: nothing to compare")
    rows = []
    for Hi in args.index_heads:
        for S in args.depths:
            t = per_layer_us(S, Hi, args.rounds)
            rows.append([Hi, S, f"{t['fp8 512']:.0f}", f"{t['fp8 amx']:.0f}", f"{t['fp8 512'] / t['fp8 amx']:.2f}x",
                         f"{S * 132 / t['fp8 amx'] / 1e3:.1f}", f"{t['bf16 amx']:.0f}",
                         f"{S * 256 / t['bf16 amx'] / 1e3:.1f}"])
            print(rows[-1], flush=True)
    table = markdown_table(["index heads", "keys", "AVX-512 us", "AMX us", "speed-up", "AMX key GB/s",
                            "bf16 cache, AMX us", "its key GB/s"], rows)
    prows = []
    for Hi in args.index_heads:
        for t, n in ((256, 16384), (512, 8192), (2048, 2048), (2048, 8192)):
            f32, f8, b16 = prefill_ms(t, Hi, n, args.rounds)
            prows.append([Hi, t, n, f"{f32:.1f}", f"{f8:.1f}", f"{f32 / f8:.2f}x",
                          f"{2 * t * Hi * n * 128 / f8 / 1e6:.0f}", f"{b16:.1f}"])
            print(prows[-1], flush=True)
    ptable = markdown_table(["index heads", "queries", "keys", "fp32 keys ms", "FP8 keys, AMX ms", "speed-up",
                             "AMX GFLOP/s", "bf16 keys ms"], prows)
    text = (f"{machine()}; a call = one layer of one decode row (4 attention heads), FP8 pools (the last two "
            f"columns: bf16 pools).\n\n{table}\n\n"
            f"A prefill's scores (cpu/indexer.index_scores, one run of consecutive keys; the engine asks for "
            f"4M / keys queries a call):\n\n{ptable}")
    print(text)
    if args.write_readme:
        write_section(HEADING, text)


if __name__ == "__main__":
    main()
