"""Sparse absorbed MLA over gathered latent rows (flash-decoding style): program (query, head
block, key split) gathers its split of the query's selected rows [c | k_rope] through the block
table, dequantises FP8 rows (e4m3 + fp32 scale per 128, bf16 rope) in registers as the cache's
`read_latent` does, and runs an online softmax; splits are merged by their log-sum-exp.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_gemm import _sm_count, interpreted


LAUNCH = dict(num_warps=8, num_stages=2)     # with BH=16, BK=16: no spills on sm_90 (bench/triton_sm90.py)


@triton.jit
def _sparse_mla(q_ptr, idx_ptr, tab_ptr, c_ptr, cs_ptr, pe_ptr, o_ptr, lse_ptr,
                T, H, K, K_SPLIT, BS_CACHE, scale,
                s_qbt, s_qh, s_ib, s_it, s_tb, s_c, s_cs, s_pe, s_obt, s_os, s_oh, s_lbt, s_ls,
                C: tl.constexpr, R: tl.constexpr, G: tl.constexpr, FP8: tl.constexpr, F32DOT: tl.constexpr,
                BH: tl.constexpr, BK: tl.constexpr):
    pid_q, pid_h, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = pid_q // T
    rh = pid_h * BH + tl.arange(0, BH)
    h_ok = rh < H
    rc, rr = tl.arange(0, C), tl.arange(0, R)
    qc = tl.load(q_ptr + pid_q * s_qbt + rh[:, None] * s_qh + rc[None, :], mask=h_ok[:, None], other=0.0)
    qr = tl.load(q_ptr + pid_q * s_qbt + rh[:, None] * s_qh + C + rr[None, :], mask=h_ok[:, None], other=0.0)
    if F32DOT:
        qc, qr = qc.to(tl.float32), qr.to(tl.float32)
    m = tl.full((BH,), -1.0e30, dtype=tl.float32)
    l = tl.zeros((BH,), dtype=tl.float32)
    acc = tl.zeros((BH, C), dtype=tl.float32)
    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    for k0 in range(k_lo, k_hi, BK):
        rk = k0 + tl.arange(0, BK)
        key = tl.load(idx_ptr + b * s_ib + (pid_q % T) * s_it + rk, mask=rk < k_hi, other=-1)
        ok = key >= 0
        key = tl.where(ok, key, 0)
        slot = tl.load(tab_ptr + b * s_tb + key // BS_CACHE, mask=ok, other=0) * BS_CACHE + key % BS_CACHE
        c = tl.load(c_ptr + slot[:, None] * s_c + rc[None, :], mask=ok[:, None], other=0.0)      # [BK, C]
        if FP8:                              # e4m3 x its group's fp32 scale, rounded to q's dtype
            rg = tl.arange(0, G)
            cs = tl.load(cs_ptr + slot[:, None] * s_cs + rg[None, :], mask=ok[:, None], other=0.0)  # [BK, G]
            c = tl.reshape(tl.reshape(c.to(tl.float32), (BK, G, 128)) * cs[:, :, None], (BK, C))
            pe = tl.load(pe_ptr + slot[:, None] * s_pe + rr[None, :], mask=ok[:, None], other=0.0)
        else:
            pe = tl.load(c_ptr + slot[:, None] * s_c + C + rr[None, :], mask=ok[:, None], other=0.0)
        c, pe = c.to(q_ptr.dtype.element_ty), pe.to(q_ptr.dtype.element_ty)
        if F32DOT:
            c, pe = c.to(tl.float32), pe.to(tl.float32)
        s = tl.dot(qc, tl.trans(c), input_precision="ieee") + tl.dot(qr, tl.trans(pe), input_precision="ieee")
        s = tl.where(ok[None, :], s * scale, float("-inf"))              # [BH, BK]
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        p = p.to(q_ptr.dtype.element_ty)                                   # as the reference: p in q's dtype
        if F32DOT:
            p = p.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, c, input_precision="ieee")
        m = m_new
    has = l > 0
    o = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    tl.store(o_ptr + pid_q * s_obt + pid_s * s_os + rh[:, None] * s_oh + rc[None, :],
             o.to(o_ptr.dtype.element_ty), mask=h_ok[:, None])
    tl.store(lse_ptr + pid_q * s_lbt + pid_s * s_ls + rh, lse, mask=h_ok)


def sparse_mla(q: torch.Tensor, idx: torch.Tensor, cache, layer: int, tables: torch.Tensor,
               scale: float, block_h: int = 16, block_k: int = 16, splits: int | None = None
               ) -> torch.Tensor:
    """q [B, T, H, C+R], idx [B, T, K] (-1 = empty) -> o_lat [B, T, H, C] in q's dtype."""
    B, T, H, _ = q.shape
    C, R, K = cache.kv_rank, cache.rope_dim, idx.shape[-1]
    q, idx = q.contiguous(), idx.contiguous()
    progs = B * T * triton.cdiv(H, block_h)
    if splits is None:
        splits = max(1, min(triton.cdiv(K, block_k), triton.cdiv(2 * _sm_count(q.device), progs)))
    k_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    splits = triton.cdiv(K, k_split)
    o = torch.empty(B * T, splits, H, C, device=q.device, dtype=q.dtype if splits == 1 else torch.float32)
    lse = torch.empty(B * T, splits, H, device=q.device)
    if cache.fp8:
        c, cs, pe = cache.c[layer], cache.c_scale[layer], cache.pe[layer]
    else:
        c = cs = pe = cache.lat[layer]
    grid = (B * T, triton.cdiv(H, block_h), splits)
    _sparse_mla[grid](q, idx, tables, c, cs, pe, o, lse, T, H, K, k_split, cache.block_size, scale,
                      q.stride(1), q.stride(2), idx.stride(0), idx.stride(1),
                      tables.stride(0), c.stride(0), cs.stride(0), pe.stride(0),
                      o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                      C=C, R=R, G=max(1, C // 128), FP8=cache.fp8, F32DOT=interpreted(q), BH=block_h, BK=block_k,
                      **LAUNCH)
    if splits == 1:
        return o[:, 0].view(B, T, H, C)
    wts = torch.softmax(lse, dim=1).nan_to_num_(0.0)                       # [BT, splits, H]
    return (o * wts.unsqueeze(-1)).sum(1).to(q.dtype).view(B, T, H, C)
