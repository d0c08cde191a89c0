"""Floors for one decoder layer of bench/gpu_layers.py: the fewest HBM bytes a step must read and
the FLOPs it must do, over the device's bandwidth and peak (datasheet, or measured on the spot).

H100 SXM5 datasheet (NVIDIA H100 Tensor Core GPU datasheet, SXM5 column, dense = without
sparsity): HBM3 3.35 TB/s, BF16 989.4 TFLOPS, FP8 1978.9 TFLOPS.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch

H100_SXM = dict(bw=3.35e12, bf16=989.4e12, fp8=1978.9e12)
FP8_CACHE_LATENT = 656        # bytes/token: 512 e4m3 + 4 fp32 scales + 64 bf16 rope
FP8_CACHE_INDEX = 132         # bytes/token: 128 e4m3 + 1 fp32 scale


class Work(NamedTuple):
    """HBM bytes and FLOPs of one layer's step (split so the tables can show where they go)."""

    weight_bytes: float
    cache_bytes: float
    act_bytes: float
    gemm_flops: float
    attn_flops: float             # indexer scoring + sparse MLA (the prefill target's numerator)

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.cache_bytes + self.act_bytes

    @property
    def flops(self) -> float:
        return self.gemm_flops + self.attn_flops


def fp8_bytes(n_out: int, n_in: int) -> float:
    """An e4m3 weight [n_out, n_in] with one fp32 scale per 128x128 block."""
    return n_out * n_in + 4 * -(-n_out // 128) * -(-n_in // 128)


def attention_params(cfg) -> dict[str, tuple[int, int]]:
    """The attention block's FP8 Linears: name -> (out, in)."""
    H, qk = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    return dict(q_a=(cfg.q_lora_rank, cfg.hidden_size), q_b=(H * qk, cfg.q_lora_rank),
                kv_a=(cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.hidden_size),
                kv_b=(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
                o=(cfg.hidden_size, H * cfg.v_head_dim),
                wq_b=(cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank),
                wk=(cfg.index_head_dim, cfg.hidden_size))


def touched_experts(cfg, tokens: int) -> float:
    """Expected distinct routed experts for `tokens` independent tokens, each picking k of E
    (any one expert is picked by a token with probability k/E)."""
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    return E * (1 - (1 - k / E) ** tokens)


def layer_work(cfg, B: int, T: int, ctx: int, act_bytes_per: int = 2) -> Work:
    """One MoE layer computing T new tokens for each of B rows that already hold `ctx` keys."""
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    H, C, R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    N = B * T
    att = attention_params(cfg)
    expert = 3 * fp8_bytes(I, D)
    routed = min(cfg.n_routed_experts, touched_experts(cfg, N))
    weights = sum(fp8_bytes(o, i) for o, i in att.values()) + expert * (routed + cfg.n_shared_experts)
    weights += 4 * D * (cfg.index_n_heads + cfg.n_routed_experts)              # fp32 head weights, gate
    # keys: every visible indexer key once; latent rows: the distinct selected rows
    total = ctx + T
    K = min(cfg.index_topk, total)
    cache = B * total * FP8_CACHE_INDEX + B * min(total, T * K) * FP8_CACHE_LATENT
    cache += N * (FP8_CACHE_INDEX + FP8_CACHE_LATENT)                          # the new entries
    act = 2 * N * D * act_bytes_per
    per_token = sum(o * i for name, (o, i) in att.items() if name != "kv_b")
    per_token += H * C * (cfg.qk_nope_head_dim + cfg.v_head_dim)              # absorbed W_uk, W_uv
    per_token += D * cfg.index_n_heads + D * cfg.n_routed_experts
    per_token += 3 * D * I * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    visible = B * (T * ctx + T * (T + 1) / 2)                                  # causal keys per query
    index = 2 * visible * cfg.index_n_heads * cfg.index_head_dim
    sel = B * sum(min(cfg.index_topk, ctx + t + 1) for t in range(T)) if T <= 64 else N * K
    mla = 2 * sel * H * ((C + R) + C)
    return Work(weights, cache, act, 2 * N * per_token, index + mla)


def measure_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-memory bandwidth from a large copy (bytes read + written per second)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        t = timer(device, lambda: dst.copy_(src))
        times.append(t)
    return 2 * nbytes / sorted(times)[len(times) // 2]


def measure_matmul(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """FLOP/s of one n x n x n product in `dtype` (random operands)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    t = sorted(timer(device, lambda: a @ b) for _ in range(5))[2]
    return 2 * n ** 3 / t


def timer(device: torch.device, fn) -> float:
    """Seconds for one call of fn (device events on CUDA)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
