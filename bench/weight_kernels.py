"""Weight-format kernel candidates in isolation, and the memory-bandwidth probe that defines the
floor: one matrix-vector product per candidate, interleaved round by round (so a busy host skews
every candidate alike), median ms and the ratio to the bandwidth floor of its stored bytes.

    python bench/weight_kernels.py [--rounds 7] [--threads 2] [--write-readme]

Shapes: the common benchmark model's output head (129280 x 256: 33 MB in int8, it stays in this
host's L3), a "wide" expert matrix (4096 x 2048, bench/load.py's dims) and the wide model's head
(129280 x 2048: read from memory). Also: activation rows up to which the compiled GEMV beats the
tiled GEMM (packed.GEMV_MAX_ROWS).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import machine, markdown_table, write_section

HEADING = "## Weight-format kernels (bench/weight_kernels.py)"


def bandwidth_gbs(gib: float = 1.0, rounds: int = 5) -> float:
    """Read bandwidth: the best of `rounds` sums over a `gib` GiB fp32 tensor (GB/s, 1e9 bytes)."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def gemm_gflops(m: int = 512, k: int = 128, n: int = 4096, rounds: int = 20) -> float:
    """fp32 GEMM rate (GFLOP/s, best of `rounds`) on the indexer's block shape: [t*H, Di] x [Di, n]
    (model/cpu/indexer.py), the compute bound of the indexer in prefill."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def e4m3_arith(b: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 bits (uint8) -> fp32, exactly, in vectorisable arithmetic (sign, exponent, mantissa)."""
    i = b.to(torch.int32)
    e = (i >> 3) & 15
    mag = ((i & 7) + torch.where(e > 0, 8, 0)).float() * torch.exp2((e.clamp(min=1) - 10).float())
    return torch.where((i & 0x80) != 0, -mag, mag)


def candidates(N: int, K: int) -> dict:
    """name -> (callable, stored bytes) for y = x W^T with W [N, K]."""
    from dsv32.model.fp8 import block_dequant, block_quant
    from dsv32.model.cpu.native import gemv
    from dsv32.model.cpu.packed import _gemv, quantize_int8
    x = torch.randn(1, K)
    w = torch.randn(N, K) / K ** 0.5
    q, s = quantize_int8(w)
    srow = w.abs().amax(1) / 127
    qrow = (w / srow[:, None]).round().to(torch.int8)
    w8, s8 = block_quant(w)
    b8, s8rows = w8.view(torch.uint8), s8.repeat_interleave(128, 0)[:N]
    w16, wb16, xh = w.half(), w.bfloat16(), x.half()
    row_k = torch.compile(lambda x, q, s: (x.view(1, -1, K) * q.view(N, 1, K).float()).sum(-1) * s.view(N, 1))
    fp8_k = torch.compile(lambda x, b, s: ((x.view(1, 1, K // 128, 128) * e4m3_arith(b).view(N, 1, K // 128, 128))
                                          .sum(-1) * s.view(N, 1, -1)).sum(-1))
    slow = {} if N * K > 1 << 26 else {    # ~2 s a call on the wide head: left out there
        "bf16 F.linear (bf16 activations)": (lambda: F.linear(x.bfloat16(), wb16), 2 * N * K)}
    return {
        "fp32 F.linear": (lambda: F.linear(x, w), 4 * N * K),
        "fp16 F.linear (fp16 activations)": (lambda: F.linear(xh, w16), 2 * N * K),
        **slow,
        "bf16, compiled upcast-and-reduce": (lambda: _gemv(x, wb16, None), 2 * N * K),
        **native_pair("bf16", "bf16", x, wb16, None, 2 * N * K),
        "fp16, compiled upcast-and-reduce": (lambda: _gemv(x, w16, None), 2 * N * K),
        "fp16, native [chosen: fp16]": (lambda: gemv(x, w16, None), 2 * N * K),
        "int8 + scale per (row, 128), compiled": (lambda: _gemv(x, q, s), N * K + 4 * s.numel()),
        **native_pair("int8 + scale per (row, 128)", "int8, fp8", x, q, s, N * K + 4 * s.numel()),
        "int8 + scale per row, compiled": (lambda: row_k(x, qrow, srow), N * K + 4 * N),
        "int8 per row, activations int8 per tensor (fbgemm dynamic; other numerics)":
            (dynamic_int8(w), N * K + 4 * N),
        "int8, torch._weight_int8pack_mm": (lambda: torch._weight_int8pack_mm(x, qrow, srow), N * K + 4 * N),
        "fp8 e4m3 decoded in the compiled kernel": (lambda: fp8_k(x, b8, s8rows), N * K + 4 * s8rows.numel()),
        "fp8 e4m3 dequantised per call, F.linear": (lambda: F.linear(x, block_dequant(w8, s8)), N * K),
    }


def native_pair(label: str, chosen: str, x, w, s, nbytes: int) -> dict:
    """The native GEMV candidates of one format: on AMX hosts the AVX-512 loop beside the tile kernel
    (which the format runs), elsewhere the vector loop alone."""
    from dsv32.model.cpu.native import AMX, amx_ready, gemv
    if not amx_ready(w.dtype):
        return {f"{label}, native (cpu/gemv.cpp) [chosen: {chosen}]": (lambda: gemv(x, w, s), nbytes)}
    return {f"{label}, native AVX-512 (cpu/gemv.cpp)": (lambda: gemv(x, w, s, 512), nbytes),
            f"{label}, native AMX tiles (cpu/amx_gemv.cpp) [chosen: {chosen}]": (lambda: gemv(x, w, s, AMX), nbytes)}


def dynamic_int8(w: torch.Tensor):
    """torch's dynamically quantised linear (fbgemm: int8 weights per row, activations quantised to
    8 bits per tensor at each call, integer dot products): a speed reference, not our numerics."""
    N, K = w.shape
    lin = torch.ao.nn.quantized.dynamic.Linear(K, N, bias_=False, dtype=torch.qint8)
    scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
    lin.set_weight_bias(torch.quantize_per_channel(w, scale, torch.zeros(N, dtype=torch.long), 0, torch.qint8), None)
    x = torch.randn(1, K)
    return lambda: lin(x)


def run_shape(N: int, K: int, rounds: int, bw: float) -> list[list]:
    cands = candidates(N, K)
    for f, _ in cands.values():                   # compile and warm up
        f()
    times = {name: [] for name in cands}
    for _ in range(rounds):                       # interleaved: each round times every candidate
        for name, (f, _) in cands.items():
            n = 5
            f()                                   # untimed: threads and caches settle after the previous one
            t = time.perf_counter()
            for _ in range(n):
                f()
            times[name].append((time.perf_counter() - t) / n * 1e3)
    base = statistics.median(times["fp32 F.linear"])
    rows = []
    for name, (_, nbytes) in cands.items():
        ms = statistics.median(times[name])
        floor = nbytes / bw / 1e6
        rows.append([f"{N}x{K}", name, f"{nbytes / 2**20:.1f}", f"{ms:.2f}", f"{floor:.2f}",
                     f"{ms / floor:.2f}x", f"{ms / base:.2f}x"])
    return rows


def gemv_vs_tiled(K: int = 2048, N: int = 4096, rounds: int = 5) -> list[list]:
    """Activation rows M: native GEMV (reads W once for all M; the vector loop converts each weight
    again for every row, the AMX tiles once) vs tiled dequantise + fp32 GEMM, and what
    packed_linear takes."""
    from dsv32.model.cpu.native import AMX, AMX_MAX_M, amx_ready, gemv
    from dsv32.model.cpu.packed import GEMV_MAX_ROWS, _gemm_tiled, quantize_int8
    q, s = quantize_int8(torch.randn(N, K) / K ** 0.5)
    rows = []
    for M in (1, 2, 4, 8, 15, 16, 32, 60, 64):
        x = torch.randn(M, K)
        amx = amx_ready(torch.int8) and M <= AMX_MAX_M
        vector = 512 if amx_ready(torch.int8) else None          # AMX implies AVX-512; else the best loop
        fs = {"vector": lambda: gemv(x, q, s, vector), "tiled": lambda: _gemm_tiled(x, q, s)}
        if amx:
            fs["amx"] = lambda: gemv(x, q, s, AMX)
        for f in fs.values():
            f()
        t = {k: [] for k in fs}
        for _ in range(rounds):
            for k, f in fs.items():
                t0 = time.perf_counter()
                f()
                t[k].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in t.items()}
        takes = "AMX GEMV" if amx else "vector GEMV" if M <= GEMV_MAX_ROWS else "tiled GEMM"
        rows.append([M, f"{med['vector']:.3f}", f"{med['amx']:.3f}" if amx else "-", f"{med['tiled']:.3f}", takes])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = bandwidth_gbs()
    rows = [r for N, K in ((129280, 256), (4096, 2048), (129280, 2048)) for r in run_shape(N, K, args.rounds, bw)]
    table = markdown_table(["W", "kernel", "stored MiB", "ms", "floor ms", "vs floor", "vs fp32"], rows)
    m_table = markdown_table(["rows M (int8, 4096x2048)", "vector GEMV ms", "AMX GEMV ms", "tiled GEMM ms",
                              "packed_linear takes"], gemv_vs_tiled())
    text = (f"Read bandwidth {bw:.1f} GB/s (best of 5 sums over 1 GiB); floor = stored bytes / bandwidth; "
            f"{machine()}.\n\n{table}\n\n{m_table}")
    print(text)
    if args.write_readme:
        write_section(HEADING, text)


if __name__ == "__main__":
    main()
