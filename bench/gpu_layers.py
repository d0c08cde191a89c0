"""Per-layer time of DeepSeek-V3.2 decoder layers at the real model's dimensions on a paged FP8
cache, eager reference path vs the fast paths (dsv32.kernels), next to the layer's floors.

    python bench/gpu_layers.py [--layers 2] [--out rows.json] [--readme]      (a CUDA GPU)
    python bench/gpu_layers.py --small                                         (CPU, seconds)

Random FP8 weights are generated on the device (no files): every Linear e4m3 with 128x128 block
scales (the indexer's head weights fp32, as loaded); the cache is filled with random FP8 entries
for each row's context, in shuffled blocks. Paths: "eager" = Block.forward over PagedKV (the
engine's path today: per-call dequantisation, the expert loop with its host sync, einsum DSA);
"fast" = FastBlock (FP8 GEMMs, packed experts, Triton DSA); "graph" = the fast layers replayed
as one CUDA graph (GraphedStep). Times are per layer (the N layers' time / N), medians of
device-event timings. Floors: bench/gpu_floors.py.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from common import machine, markdown_table, write_section
from gpu_floors import H100_SXM, layer_work, measure_bandwidth, measure_matmul, timer

HEADING = "## GPU layers (bench/gpu_layers.py)"
REAL = dict(hidden_size=7168, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
            qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, moe_intermediate_size=2048,
            n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
            index_n_heads=64, index_head_dim=128, index_topk=2048)
SMALL = dict(hidden_size=256, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=128,
             qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32, moe_intermediate_size=128,
             n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
             index_n_heads=4, index_head_dim=128, index_topk=64)
BLOCK = 64                                                           # cache block size (tokens)


def make_config(dims: dict, layers: int):
    from dsv32.model.config import ModelConfig
    return ModelConfig.from_dict(dict(model_type="deepseek_v32", vocab_size=1024, intermediate_size=dims["hidden_size"],
                                      num_hidden_layers=layers, first_k_dense_replace=0, num_nextn_predict_layers=0,
                                      num_key_value_heads=dims["num_attention_heads"], **dims))


@torch.no_grad()
def build_layers(cfg, device, dtype, seed: int = 0) -> list:
    """N MoE decoder blocks with random FP8 weights made on `device` (built on meta, so the
    dense weights never exist)."""
    from dsv32.model.block import Block
    from dsv32.model.layers import Linear
    with torch.device("meta"):
        blocks = [Block(cfg, i, dtype) for i in range(cfg.num_hidden_layers)]
    for blk in blocks:
        for mod in blk.modules():
            if isinstance(mod, Linear) and mod is not blk.self_attn.indexer.weights_proj:
                mod.use_fp8_storage()
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for blk in blocks:
        blk = blk.to_empty(device=device).eval()
        for name, p in blk.named_parameters():
            if p.dtype == torch.float8_e4m3fn:                    # e4m3 values ~ N(0, 32^2)
                for rows in p.split(4096):
                    rows.copy_((torch.randn(rows.shape, device=device, generator=g) * 32).clamp_(-448, 448))
            elif name.endswith("weight_scale_inv"):               # dequantised weight ~ N(0, 1/in)
                p.uniform_(0.9, 1.1, generator=g).div_(32 * math.sqrt(128 * p.shape[1]))
            elif name.endswith("e_score_correction_bias") or name.endswith(".bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0, p.shape[1] ** -0.5, generator=g)
        out.append(blk)
    return out


def make_cache(cfg, n_layers, B, ctx, device, dtype, seed=0):
    """A PagedCache whose B rows hold `ctx` random FP8 entries each (shuffled blocks) and room
    for `room` more: (cache, tables [B, nb])."""
    from dsv32.engine.cache import PagedCache
    nb = -(-ctx // BLOCK)
    cache = PagedCache(n_layers, B * nb + 1, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim,
                       block_size=BLOCK, dtype=dtype, device=device, fp8=True)
    g = torch.Generator(device=device).manual_seed(seed)
    for t in (cache.c, cache.ik):                                  # random e4m3 bytes, never NaN
        for chunk in t.view(torch.uint8).view(-1).split(1 << 28):
            chunk.random_(0, 256, generator=g).bitwise_and_(0xF7)
    cache.c_scale.uniform_(0.002, 0.004, generator=g)
    cache.ik_scale.uniform_(0.002, 0.004, generator=g)
    cache.pe.normal_(generator=g)
    tables = torch.randperm(cache.num_blocks, device=device, generator=g)[: B * nb].view(B, nb)
    return cache, tables


class Scenario:
    """B rows computing T new tokens each at positions ctx-T..ctx-1 of a cache of ctx keys."""

    def __init__(self, cfg, layers, B, T, ctx, device, dtype, rotary):
        from dsv32.kernels.paged import key_slots
        self.B, self.T, self.ctx = B, T, ctx
        self.cache, self.tables = make_cache(cfg, len(layers), B, ctx, device, dtype)
        self.pos = torch.arange(ctx - T, ctx, device=device).expand(B, T).contiguous()
        self.slots = key_slots(self.tables, self.pos, BLOCK)
        self.ctx_t = torch.full((B,), ctx, device=device)
        self.cos, self.sin = rotary(self.pos)
        self.h = torch.randn(B, T, cfg.hidden_size, device=device, dtype=dtype)


def eager(layers, sc):
    from dsv32.engine.cache import PagedKV
    kv = PagedKV(sc.cache, sc.tables, sc.ctx_t, sc.slots)
    h = sc.h
    for blk in layers:
        h = blk(h, sc.pos, sc.cos, sc.sin, kv)
    return h


def fast_fn(fast, rotary, cache):
    """The fast layers as a step of (h, pos, slots, tables) (what GraphedStep captures)."""
    from dsv32.kernels.layer import Batch

    def step(h, pos, slots, tables):
        cos, sin = rotary(pos)
        batch = Batch(cache, tables, slots, tables.shape[1] * BLOCK)
        for fb in fast:
            h = fb(h, pos, cos, sin, batch)
        return h
    return step


class Unpacked:
    """Run the MoE layers through their reference expert loop inside the `with`."""

    def __init__(self, layers):
        self.layers = layers

    def __enter__(self):
        self.saved = [b.mlp.packed for b in self.layers]
        for b in self.layers:
            b.mlp.packed = None

    def __exit__(self, *exc):
        for b, p in zip(self.layers, self.saved):
            b.mlp.packed = p


def median_time(fn, device, reps: int, budget_s: float) -> float:
    """Median seconds of fn after two warm-up calls; fewer repeats when one call is slow."""
    timer(device, fn)
    t = timer(device, fn)
    n = max(1, min(reps, int(budget_s / max(t, 1e-9))))
    return statistics.median([timer(device, fn) for _ in range(n)])


def attempt(row: dict, key: str, fn) -> None:
    """row[key] = fn(); a failure is recorded as row[key + "_error"] and the run goes on (one
    broken path must not cost the other numbers of a short GPU lease)."""
    try:
        row[key] = fn()
    except Exception as e:                                      # noqa: BLE001 - reported, not hidden
        row[key + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"  {key} failed: {row[key + '_error']}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def attention_parts(cfg, layers, sc, backend, device, dtype, reps, peak) -> dict:
    """Prefill-chunk DSA alone (layer 0, random queries): indexer scores, top-k, sparse MLA."""
    from dsv32.kernels import paged
    B, T, Hi, Di, H = sc.B, sc.T, cfg.index_n_heads, cfg.index_head_dim, cfg.num_attention_heads
    S = sc.tables.shape[1] * BLOCK
    q = torch.randn(B, T, Hi, Di, device=device, dtype=dtype)
    w = torch.randn(B, T, Hi, device=device)
    qa = torch.randn(B, T, H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, device=device, dtype=dtype)
    scores = paged.indexer_scores(q, w, sc.cache, 0, sc.tables, sc.pos, S, backend)
    idx = paged.topk_ids(scores, cfg.index_topk)
    scale = layers[0].self_attn.scale
    t_idx = median_time(lambda: paged.indexer_scores(q, w, sc.cache, 0, sc.tables, sc.pos, S, backend), device, reps, 5)
    t_top = median_time(lambda: paged.topk_ids(scores, cfg.index_topk), device, reps, 5)
    t_mla = median_time(lambda: paged.sparse_mla(qa, idx, sc.cache, 0, sc.tables, scale, backend), device, reps, 5)
    f = layer_work(cfg, B, T, sc.ctx - T).attn_flops
    t = t_idx + t_top + t_mla
    return dict(ctx=sc.ctx, T=T, indexer=t_idx, topk=t_top, sparse_mla=t_mla, flops=f, tflops=f / t / 1e12,
                pct_peak=100 * f / t / peak["bf16"])


def run(args) -> tuple[list[dict], list[dict], dict]:
    from dsv32.kernels.graphs import Arg, GraphedStep
    from dsv32.kernels.layer import FastBlock, Linears
    from dsv32.model.layers import Rotary
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    backend = args.backend or ("triton" if device.type == "cuda" else "torch")
    cfg = make_config(SMALL if args.small else REAL, args.layers)
    t0 = time.perf_counter()
    ceil = dict(bw=measure_bandwidth(device, (1 << 31) if device.type == "cuda" else (1 << 26)),
                flops=measure_matmul(device, 8192 if device.type == "cuda" else 512, dtype))
    layers = build_layers(cfg, device, dtype)
    rotary = Rotary(cfg).to(device)
    fast = [FastBlock(b, Linears(backend, args.gemm), dtype) for b in layers]   # packs the experts
    print(f"built {args.layers} layers in {time.perf_counter() - t0:.1f} s; measured copy "
          f"{ceil['bw'] / 1e9:.0f} GB/s, {dtype} matmul {ceil['flops'] / 1e12:.3f} TFLOP/s", flush=True)
    peak = H100_SXM if device.type == "cuda" else dict(bw=ceil["bw"], bf16=ceil["flops"])
    N = len(layers)
    rows, parts = [], []
    cases = [(B, 1, c) for c in args.contexts for B in args.batches] + [(1, args.prefill, c) for c in args.contexts]
    for B, T, ctx in cases:
        sc = Scenario(cfg, layers, B, T, max(ctx, T), device, dtype, rotary)
        left = args.budget_s - (time.perf_counter() - t0)
        row = dict(step="decode" if T == 1 else f"prefill {T}", batch=B, ctx=ctx)
        step = fast_fn(fast, rotary, sc.cache)
        with torch.inference_mode():
            attempt(row, "fast", lambda: median_time(lambda: step(sc.h, sc.pos, sc.slots, sc.tables),
                                                     device, args.reps, 10) / N)
            attempt(row, "fast_attn", lambda: median_time(
                lambda: fast[0].attn(sc.h, sc.pos, sc.cos, sc.sin, _batch(sc)), device, args.reps, 5))
            if device.type == "cuda" and T == 1:
                g = GraphedStep(step, [Arg(0.0), Arg(0), Arg(-1), Arg(0, width=True)], (B,), (sc.tables.shape[1],))
                attempt(row, "graph", lambda: median_time(lambda: g(sc.h, sc.pos, sc.slots, sc.tables),
                                                          device, args.reps * 3, 10) / N)
                del g
            if left > 0 and not (T > 1 and ctx > args.eager_prefill_max):
                with Unpacked(layers):
                    attempt(row, "eager", lambda: median_time(lambda: eager(layers, sc), device, args.reps,
                                                              min(20, left / 4)) / N)
            if T > 1:
                attempt(row, "dsa", lambda: parts.append(attention_parts(cfg, layers, sc, backend, device,
                                                                         dtype, args.reps, peak)))
        w = layer_work(cfg, B, T, ctx - T)
        row.update(hbm_floor=w.bytes / peak["bw"], hbm_floor_measured=w.bytes / ceil["bw"],
                   flop_floor=w.flops / peak["bf16"], bytes=w.bytes, flops=w.flops)
        rows.append(row)
        print(fmt_row(row), flush=True)
        if args.out:                                     # kept current: a timeout still leaves the rows
            with open(args.out, "w") as f:
                json.dump(dict(rows=rows, prefill_dsa=parts), f, indent=1)
        del sc, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    info = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else machine(),
                dtype=str(dtype), backend=backend, gemm=args.gemm, layers=N, measured=ceil,
                seconds=time.perf_counter() - t0)
    return rows, parts, info


def _batch(sc):
    from dsv32.kernels.layer import Batch
    return Batch(sc.cache, sc.tables, sc.slots, sc.tables.shape[1] * BLOCK)


def ms(x):
    return "-" if x is None else f"{1e3 * x:.3f}"


def best_ratio(r: dict) -> str:
    """The best path's time over max(HBM floor, FLOP floor)."""
    times = [v for v in (r.get("fast"), r.get("graph"), r.get("eager")) if v is not None]
    return f"{min(times) / max(r['hbm_floor'], r['flop_floor']):.2f}x" if times else "-"


def fmt_row(r: dict) -> str:
    return (f"{r['step']:>12} B={r['batch']:<3} ctx={r['ctx']:<7} eager {ms(r.get('eager'))} fast {ms(r.get('fast'))} "
            f"graph {ms(r.get('graph'))} | floor hbm {ms(r['hbm_floor'])} flop {ms(r['flop_floor'])} | best/floor {best_ratio(r)}")


def tables(rows, parts, info) -> str:
    head = ["step", "batch", "context", "eager ms", "fast ms", "graph ms", "fast attn ms (layer)",
            "HBM floor ms", "FLOP floor ms", "best / max(floors)"]
    body = []
    for r in rows:
        body.append([r["step"], r["batch"], r["ctx"], ms(r.get("eager")), ms(r.get("fast")), ms(r.get("graph")),
                     ms(r.get("fast_attn")), ms(r["hbm_floor"]), ms(r["flop_floor"]), best_ratio(r)])
    errors = [f"{r['step']} B={r['batch']} ctx={r['ctx']} {k}: {v}" for r in rows for k, v in r.items()
              if k.endswith("_error")]
    out = [f"{info['device']}, {info['dtype']}, backend {info['backend']}, gemm "
           f"{info['gemm']}, {info['layers']} layers; measured copy {info['measured']['bw'] / 1e9:.0f} GB/s, "
           f"matmul {info['measured']['flops'] / 1e12:.3f} TFLOP/s; run {info['seconds']:.0f} s.",
           "", "Per layer:", "", markdown_table(head, body)]
    if errors:
        out += ["", "Failed:", ""] + [f"- {e}" for e in errors]
    if parts:
        out += ["", "Prefill chunk DSA alone (layer 0): indexer scores, top-k, sparse MLA:", "",
                markdown_table(["context", "chunk", "indexer ms", "top-k ms", "sparse MLA ms", "TFLOP/s",
                                "% of dense bf16 peak"],
                               [[p["ctx"], p["T"], ms(p["indexer"]), ms(p["topk"]), ms(p["sparse_mla"]),
                                 f"{p['tflops']:.1f}", f"{p['pct_peak']:.1f}%"] for p in parts])]
    return "\n".join(out)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small dimensions, CPU-sized contexts (a smoke run)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--prefill", type=int)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=360.0, help="stop timing the eager path after this")
    ap.add_argument("--eager-prefill-max", type=int, default=32768, help="longest context for eager prefill")
    ap.add_argument("--device"), ap.add_argument("--dtype"), ap.add_argument("--backend")
    ap.add_argument("--gemm", default="w8a16", choices=["w8a16", "w8a8"])
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--readme", action="store_true", help=f"write the tables under '{HEADING}'")
    args = ap.parse_args(argv)
    args.contexts = args.contexts or ([96, 320] if args.small else [4096, 32768, 131072])
    args.batches = args.batches or ([1, 3] if args.small else [1, 16, 64])
    args.prefill = args.prefill or (32 if args.small else 4096)
    if args.small:
        args.reps = min(args.reps, 2)
        torch.set_num_threads(1)      # tiny ops on a shared CPU: one thread avoids OpenMP waits
    rows, parts, info = run(args)
    text = tables(rows, parts, info)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(info=info, rows=rows, prefill_dsa=parts), f, indent=1)
    if args.readme:
        write_section(HEADING, text)
    return text


if __name__ == "__main__":
    main()
