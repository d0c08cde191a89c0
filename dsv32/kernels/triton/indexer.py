"""Lightning-indexer scores over the paged key cache:
    I[b, t, s] = sum_h w[b, t, h] * relu(q[b, t, h] . k[s])      for s <= pos[b, t], else -inf.
A program holds BT queries x H heads as one [BT*H, Di] tile and streams key blocks of its split
of the context through one MMA each; FP8 keys (e4m3 + one fp32 scale per 128 dims) enter the
MMA as e4m3 values converted exactly to q's dtype and are scaled per key afterwards
(relu(s * x) = s * relu(x) for the positive scale).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_gemm import _sm_count, interpreted


LAUNCH = dict(num_warps=8, num_stages=3)     # for BT*BH >= 64 (the real model: 64 heads)


@triton.jit
def _indexer(q_ptr, w_ptr, pos_ptr, tab_ptr, k_ptr, ks_ptr, out_ptr,
             T, H, S, S_SPLIT, BS_CACHE,
             s_qb, s_qt, s_qh, s_wb, s_wt, s_pb, s_tb, s_ks, s_kss, s_ob, s_ot,
             DI: tl.constexpr, G: tl.constexpr, FP8: tl.constexpr, F32DOT: tl.constexpr,
             BT: tl.constexpr, BH: tl.constexpr, BS: tl.constexpr):
    pid_bt, pid_s = tl.program_id(0), tl.program_id(1)
    nt = tl.cdiv(T, BT)
    b, t0 = pid_bt // nt, (pid_bt % nt) * BT
    rt = t0 + tl.arange(0, BT)                                          # [BT]
    rh = tl.arange(0, BH)                                               # [BH]
    rd = tl.arange(0, DI)                                               # [DI]
    t_ok, h_ok = rt < T, rh < H
    pos = tl.load(pos_ptr + b * s_pb + rt, mask=t_ok, other=-1)         # [BT]
    qm = (t_ok[:, None] & h_ok[None, :])                                # [BT, BH]
    q = tl.load(q_ptr + b * s_qb + rt[:, None, None] * s_qt + rh[None, :, None] * s_qh + rd[None, None, :],
                mask=qm[:, :, None], other=0.0)                         # [BT, BH, DI]
    q = tl.reshape(q, (BT * BH, DI))
    w = tl.load(w_ptr + b * s_wb + rt[:, None] * s_wt + rh[None, :], mask=qm, other=0.0)   # [BT, BH]
    s_lo = pid_s * S_SPLIT
    s_hi = tl.minimum(tl.minimum(S, s_lo + S_SPLIT), tl.max(pos) + 1)   # no key after the last query
    for s0 in range(s_lo, s_hi, BS):
        rs = s0 + tl.arange(0, BS)                                       # [BS] key positions
        s_ok = rs < s_hi
        slot = tl.load(tab_ptr + b * s_tb + rs // BS_CACHE, mask=s_ok, other=0) * BS_CACHE + rs % BS_CACHE
        k = tl.load(k_ptr + slot[:, None] * s_ks + rd[None, :], mask=s_ok[:, None], other=0.0)  # [BS, DI]
        qq = q
        if FP8:
            k = k.to(q.dtype)
        if F32DOT:
            qq, k = q.to(tl.float32), k.to(tl.float32)
        if FP8 and G > 1:                            # one scale per 128 dims: a dot per group
            x = tl.zeros((BT * BH, BS), dtype=tl.float32)
            for g in tl.static_range(G):
                gm = (rd // 128) == g
                ksc = tl.load(ks_ptr + slot * s_kss + g, mask=s_ok, other=0.0)
                kg = tl.where(gm[None, :], k, 0.0).to(k.dtype)
                x += tl.dot(qq, tl.trans(kg), input_precision="ieee") * ksc[None, :]
        else:
            x = tl.dot(qq, tl.trans(k), input_precision="ieee")           # [BT*BH, BS]
            if FP8:
                x = x * tl.load(ks_ptr + slot * s_kss, mask=s_ok, other=0.0)[None, :]
        x = tl.reshape(tl.maximum(x, 0.0), (BT, BH, BS))
        sc = tl.sum(x * w[:, :, None], axis=1)                          # [BT, BS]
        sc = tl.where(rs[None, :] <= pos[:, None], sc, float("-inf"))
        tl.store(out_ptr + b * s_ob + rt[:, None] * s_ot + rs[None, :], sc,
                 mask=t_ok[:, None] & s_ok[None, :])


def indexer_scores(q: torch.Tensor, w: torch.Tensor, cache, layer: int, tables: torch.Tensor,
                   positions: torch.Tensor, S: int, block_t: int | None = None, block_s: int = 64
                   ) -> torch.Tensor:
    """q [B, T, H, Di], w [B, T, H] fp32, positions [B, T] -> scores [B, T, S] fp32 (-inf where
    not visible); keys read from `cache` (a PagedCache) layer `layer` through tables [B, nb]."""
    B, T, H, Di = q.shape
    q, w, positions = q.contiguous(), w.float().contiguous(), positions.contiguous()
    out = torch.full((B, T, S), float("-inf"), device=q.device)
    BH = max(16, triton.next_power_of_2(H))
    BT = block_t or (1 if T == 1 else max(1, 128 // BH))
    fp8 = cache.fp8
    k = cache.ik[layer]
    ks = cache.ik_scale[layer] if fp8 else k
    progs = B * triton.cdiv(T, BT)
    split = max(1, min(triton.cdiv(S, block_s), triton.cdiv(2 * _sm_count(q.device), progs)))
    s_split = triton.cdiv(triton.cdiv(S, split), block_s) * block_s
    grid = (progs, triton.cdiv(S, s_split))
    _indexer[grid](q, w, positions, tables, k, ks, out, T, H, S, s_split, cache.block_size,
                   q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), positions.stride(0),
                   tables.stride(0), k.stride(0), ks.stride(0), out.stride(0), out.stride(1),
                   DI=Di, G=Di // 128 if fp8 else 1, FP8=fp8, F32DOT=interpreted(q),
                   BT=BT, BH=BH, BS=block_s, **(LAUNCH if BT * BH >= 64 else dict(num_warps=4, num_stages=3)))
    return out
