"""The sparse attention with many heads over a bf16 or FP8 cache: the vector code against AMX tiles.

Decode: one row's attention over K selected latent rows (native.decode_attention with S = K =
top-k, so every row is selected and no indexer runs), on the AVX-512 code (sparse_attention.cpp:
scores and weighted sums by FMAs, rows read in place) and on AMX tiles (amx_attention.cpp: both
products GEMMs on tiles, the query and the probabilities in three bf16 limbs), alternating in one
process; beside them the gather + torch GEMMs in fp32 (MLA.attend_latent's formula: gather the rows,
convert, q . rows^T, softmax, p . rows). Prefill: t queries, each over its own K rows
(native.sparse_prefill), the same two builds. Pools: bf16, and FP8 (engine/cache.py's layout: e4m3
with a scale per 128 values, bf16 rope). Engine: a checkpoint with DeepSeek-V3.2's attention shapes
(128 heads, top-k 2048, 64 index heads; 2 small layers otherwise, fp32 weights) prefilling a
`--engine-prompt`-token prompt in 2048-token chunks, then decoding, with the native attention calls
on their default build (AMX) or on the AVX-512 one, alternating.

    python bench/attention_kernels.py [--heads 16 32 64 128] [--rows 256 2048] [--pools bf16 fp8]
                                      [--engine-prompt 6144] [--write-readme]

Heads 128: DeepSeek-V3.2's on one rank; 16: the wide model's. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch

from common import host_load, machine, markdown_table, write_section
from index_kernels import pools

HEADING = "## Sparse attention kernels (bench/attention_kernels.py)"
C, R, BLOCK, SCALE = 512, 64, 64, 0.07


def cache_pages(S: int, pool: str):
    """bf16 or FP8 (index_kernels.pools) pools holding S random keys in shuffled blocks."""
    from dsv32.model.cpu.pages import Pages
    if pool == "fp8":
        return pools(S, BLOCK, C, R)
    nb = -(-S // BLOCK)
    return Pages(torch.randn(nb * BLOCK, C + R).to(torch.bfloat16), torch.randn(nb * BLOCK, 128).to(torch.bfloat16),
                 torch.randperm(nb), BLOCK)


def gathered(q: torch.Tensor, pages, S: int) -> torch.Tensor:
    """The gather + fp32 GEMMs of MLA.attend_latent for one row over the first S keys."""
    from dsv32.model.fp8 import dequantize_groups
    pos = torch.arange(S)
    slots = pages.table[pos // BLOCK] * BLOCK + pos % BLOCK
    if pages.latent_scale is None:
        rows = pages.latent[slots].float()                                             # [S, C+R]
    else:
        rows = torch.cat((dequantize_groups(pages.latent[slots], pages.latent_scale[slots], torch.float32),
                          pages.rope[slots].float()), -1)
    return torch.softmax(SCALE * q @ rows.T, -1) @ rows[:, :C]


def decode_us(H: int, K: int, pool: str, rounds: int) -> dict[str, float]:
    """Best-of-rounds microseconds of one decode row's attention over K rows: AVX-512, AMX, gather + GEMM."""
    from dsv32.model.cpu import native
    pages = cache_pages(K, pool)
    latent, index_k, q = torch.randn(C + R), torch.randn(128), torch.randn(H, C + R)
    iq, iw = torch.randn(8, 128), torch.randn(8)
    runs = {"512": lambda: native.decode_attention(latent, index_k, q, iq, iw, pages, K, K, SCALE, C, 512),
            "amx": lambda: native.decode_attention(latent, index_k, q, iq, iw, pages, K, K, SCALE, C, native.AMX),
            "gemm": lambda: gathered(q, pages, K)}
    return best_of(runs, rounds, 5)


def prefill_ms(H: int, t: int, K: int, pool: str, rounds: int) -> dict[str, float]:
    """Best-of-rounds milliseconds of t queries' sparse attention, each over its own K of 4K rows."""
    from dsv32.model.cpu import native
    pages = cache_pages(4 * K, pool)
    ids = torch.stack([torch.randperm(4 * K)[:K].sort().values for _ in range(t)])
    q = torch.randn(t, H, C + R)
    runs = {"512": lambda: native.sparse_prefill(q, ids, pages, SCALE, C, 512),
            "amx": lambda: native.sparse_prefill(q, ids, pages, SCALE, C, native.AMX)}
    return {k: v / 1e3 for k, v in best_of(runs, rounds, 1).items()}


@contextlib.contextmanager
def vector_attention(on: bool):
    """native.decode_attention and native.sparse_prefill on the AVX-512 build while `on`."""
    from dsv32.model.cpu import native
    real = native.decode_attention, native.sparse_prefill
    if on:
        native.decode_attention = lambda *a: real[0](*a, 512)
        native.sparse_prefill = lambda *a: real[1](*a, 512)
    try:
        yield
    finally:
        native.decode_attention, native.sparse_prefill = real


def engine_rates(L: int, pool: str, rounds: int) -> dict[str, tuple[float, float]]:
    """{build: (prefill tok/s, decode ms/token)} of a 128-head checkpoint's engine, best of rounds."""
    from dsv32.engine.engine import EngineConfig, LLMEngine
    from dsv32.engine.sequence import SamplingParams
    from dsv32.model.init_tiny import init_tiny
    path = Path(tempfile.mkdtemp(prefix="dsv32_h128_"))
    init_tiny(path, seed=1, layers=2, heads=128, topk=2048, kv_lora=C, rope=R, nope=128, v=128, index_dim=128,
              index_heads=64, hidden=256, q_lora=256)
    eng = LLMEngine(EngineConfig(model=str(path), max_model_len=L + 64, max_num_seqs=1, max_num_batched_tokens=2048,
                                 enable_prefix_caching=False, kv_cache_dtype={"bf16": "bfloat16", "fp8": "fp8"}[pool]))

    def run(vector: bool, seed: int, n: int = 9) -> tuple[float, float]:
        prompt = torch.randint(1000, 8000, (L,), generator=torch.Generator().manual_seed(seed)).tolist()
        eng.add_request(str(seed), prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        with vector_attention(vector):
            t0 = time.perf_counter()
            while not any(o.outputs[0].token_ids for o in eng.step()):
                pass
            t1 = time.perf_counter()
            while eng.has_unfinished():
                eng.step()
        return L / (t1 - t0), (time.perf_counter() - t1) / (n - 1) * 1e3

    run(False, 0, 3), run(True, 0, 3)                   # compile outside the timing
    best = {"amx": (0.0, float("inf")), "512": (0.0, float("inf"))}
    for r in range(rounds):
        for name in best:
            p, d = run(name == "512", r + 1)
            best[name] = (max(best[name][0], p), min(best[name][1], d))
    return best


def best_of(runs: dict, rounds: int, calls: int) -> dict[str, float]:
    """The runs alternating, `calls` calls a round: the best round's microseconds a call of each."""
    for f in runs.values():
        f()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, f in runs.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--pools", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--engine-prompt", type=int, default=6144, help="the engine run's prompt (0: none)")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    from dsv32.model.cpu import native
    if not native._amx_index_ready():
        raise SystemExit("this CPU (or Linux, for this process) has no AMX-BF16: nothing to compare")
    print(f"host load: {host_load()}", flush=True)
    rows = []
    for pool in args.pools:
        for H in args.heads:
            for K in args.rows:
                t = decode_us(H, K, pool, args.rounds)
                flops = 2 * H * K * (2 * C + R)
                rows.append([pool, H, K, f"{t['512']:.0f}", f"{t['amx']:.0f}", f"{t['512'] / t['amx']:.2f}x",
                             f"{flops / t['amx'] / 1e3:.0f}", f"{t['gemm']:.0f}", f"{t['gemm'] / t['amx']:.2f}x"])
                print(rows[-1], flush=True)
    table = markdown_table(["pool", "heads", "rows", "AVX-512 us", "AMX us", "speed-up", "AMX GFLOP/s",
                            "gather + GEMM us", "GEMM / AMX"], rows)
    prows = []
    for pool in args.pools:
        for H in (16, 128):
            t = prefill_ms(H, 64, 2048, pool, max(3, args.rounds // 3))
            prows.append([pool, H, 64, 2048, f"{t['512']:.1f}", f"{t['amx']:.1f}", f"{t['512'] / t['amx']:.2f}x"])
            print(prows[-1], flush=True)
    ptable = markdown_table(["pool", "heads", "queries", "rows each", "AVX-512 ms", "AMX ms", "speed-up"], prows)
    erows = []
    for pool in args.pools if args.engine_prompt else []:
        e = engine_rates(args.engine_prompt, pool, 2)
        erows.append([pool, args.engine_prompt, f"{e['512'][0]:.0f}", f"{e['amx'][0]:.0f}",
                      f"{e['amx'][0] / e['512'][0]:.2f}x", f"{e['512'][1]:.1f}", f"{e['amx'][1]:.1f}",
                      f"{e['512'][1] / e['amx'][1]:.2f}x"])
        print(erows[-1], flush=True)
    etable = markdown_table(["pool", "prompt", "prefill tok/s, AVX-512", "AMX", "speed-up", "decode ms/token, AVX-512",
                             "AMX", "speed-up"], erows) if erows else ""
    text = (f"{machine()}; latent pools of C {C} + rope {R} values, best of {args.rounds} alternating rounds.\n\n"
            f"One decode row (a layer):\n\n{table}\n\n"
            f"A prefill's queries (native.sparse_prefill):\n\n{ptable}"
            + (f"\n\nThe engine on a checkpoint with V3.2's attention shapes (128 heads, top-k 2048, 64 index "
               f"heads; 2 layers of hidden 256, fp32 weights), best of 2 alternating rounds:\n\n{etable}" if etable else ""))
    print(text)
    if args.write_readme:
        write_section(HEADING, text)


if __name__ == "__main__":
    main()
