"""Grouped GEMM over expert-sorted rows (the fused-MoE layout): program (m, n) multiplies the
BM assignment rows of block m, all routed to one expert `block_expert[m]`, by that expert's weight
[N, K] (e4m3 with 128x128 block scales, or a float weight). Empty blocks run no K loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_gemm import interpreted, stages


@triton.jit
def _moe_gemm(a_ptr, w_ptr, ws_ptr, c_ptr, rows_ptr, bexp_ptr, rw_ptr,
              N, K, A, E, A_DIV,
              s_am, s_ak, s_we, s_wn, s_wk, s_wse, s_wsn, s_wsk, s_cm, s_cn,
              HAS_SCALE: tl.constexpr, MUL_W: tl.constexpr, F32DOT: tl.constexpr, PREC: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(bexp_ptr + pid_m)
    e_ok = e < E
    e = tl.where(e_ok, e, 0)
    rows = tl.load(rows_ptr + pid_m * BM + tl.arange(0, BM))           # [BM] assignment ids
    r_ok = rows < tl.where(e_ok, A, 0)                                  # padding, empty block
    a_row = tl.where(r_ok, rows // A_DIV, 0)                             # token (or assignment) row
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_hi = tl.where(e_ok, K, 0)                                          # an empty block: no loop
    for k0 in range(0, k_hi, BK):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(a_ptr + a_row[:, None] * s_am + kk[None, :] * s_ak,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)           # [BM, BK]
        w = tl.load(w_ptr + e * s_we + kk[:, None] * s_wk + rn[None, :] * s_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)           # [BK, BN]
        if HAS_SCALE:                           # block scale folded into the tile (block_dequant's rounding)
            ws = tl.load(ws_ptr + e * s_wse + (rn // 128) * s_wsn + (k0 // 128) * s_wsk, mask=n_ok, other=0.0)
            w = w.to(tl.float32) * ws[None, :]
        w = w.to(a.dtype)
        if F32DOT:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PREC)
    if MUL_W:
        acc = acc * tl.load(rw_ptr + rows, mask=r_ok, other=0.0)[:, None]
    c = c_ptr + rows[:, None] * s_cm + rn[None, :] * s_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])


def launch(block_m: int, a_size: int) -> dict:
    """num_warps / num_stages for block_m rows (BN 64): 8 warps from 64 rows, else spills on sm_90."""
    return dict(num_warps=8 if block_m >= 64 else 4, num_stages=stages(block_m * 128 * a_size + 128 * 64))


def moe_gemm(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None, rows: torch.Tensor,
             block_expert: torch.Tensor, n_rows: int, a_div: int, block_m: int,
             row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """a [R, K] (row of assignment i: a[i // a_div]); w [E, N, K] (+ w_scale [E, N/128, K/128]);
    rows [P] assignment ids sorted by expert (n_rows = padding), block_expert [P / block_m]
    -> c [n_rows, N] in a's dtype (times row_weight [n_rows] when given)."""
    E, N, K = w.shape
    c = torch.empty(n_rows, N, device=a.device, dtype=a.dtype)
    BN = 64                                                               # see fp8_gemm.config
    ws = w_scale if w_scale is not None else w                            # unused without scales
    rw = row_weight if row_weight is not None else rows
    sws = ws.stride() if w_scale is not None else (0, 0, 0)
    grid = (block_expert.numel(), triton.cdiv(N, BN))
    _moe_gemm[grid](a, w, ws, c, rows, block_expert, rw, N, K, n_rows, E, a_div,
                    a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), *sws,
                    c.stride(0), c.stride(1),
                    HAS_SCALE=w_scale is not None, MUL_W=row_weight is not None,
                    F32DOT=interpreted(a), PREC="ieee" if a.dtype == torch.float32 else "tf32",
                    BM=block_m, BN=BN, BK=128, **launch(block_m, a.element_size()))
    return c
