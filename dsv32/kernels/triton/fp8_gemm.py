"""Triton GEMM with DeepSeek's FP8 block-scaled weights: y = x W^T, W e4m3 [N, K] with one fp32
scale per 128x128 block. Two activation modes:
  * W8A16: x in bf16/fp16/fp32, each weight tile dequantised in registers to x's dtype (the
    rounding of `block_dequant`) and fed to the MMA (decode: bound by reading W once);
  * W8A8: x quantised to e4m3 with one scale per 1x128 group (fp8 tensor cores; prefill).
Split-K writes fp32 partials [S, M, N] summed afterwards (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128   # the checkpoint's weight block (both dims) and the activation group


@triton.jit
def _fp8_gemm(a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, M, N, K, K_SPLIT,
              s_am, s_ak, s_asm, s_ask, s_wn, s_wk, s_wsn, s_wsk, s_cs, s_cm, s_cn,
              A_FP8: tl.constexpr, PREC: tl.constexpr, F32DOT: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)                                   # [BM]
    rn = pid_n * BN + tl.arange(0, BN)                                   # [BN]
    rk = tl.arange(0, BK)                                                # [BK]
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)           # [BM, BK]
        w = tl.load(w_ptr + kk[:, None] * s_wk + rn[None, :] * s_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)           # [BK, BN] e4m3
        ws = tl.load(ws_ptr + (rn // 128) * s_wsn + (k0 // 128) * s_wsk, mask=n_ok, other=0.0)
        if A_FP8:
            xs = tl.load(as_ptr + rm * s_asm + (k0 // 128) * s_ask, mask=m_ok, other=0.0)
            if F32DOT:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(a, w, input_precision=PREC) * xs[:, None] * ws[None, :]
        else:
            # the block scale folded into the weight tile: W rounded to x's dtype exactly as
            # `block_dequant` rounds it, and the MMA accumulates in place (no second accumulator)
            w = (w.to(tl.float32) * ws[None, :]).to(a.dtype)
            if F32DOT:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PREC)
    c = c_ptr + pid_k * s_cs + rm[:, None] * s_cm + rn[None, :] * s_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def interpreted(x: torch.Tensor) -> bool:
    """CPU tensors run only under TRITON_INTERPRET=1, whose 16-bit dots are wrong: upcast there."""
    return x.device.type != "cuda"


def stages(stage_bytes: int, limit: int = 160 * 1024, most: int = 4) -> int:
    """Software-pipelining depth whose shared-memory stages (stage_bytes each) fit in `limit`."""
    return max(1, min(most, limit // max(1, stage_bytes)))


def gemm_launch(BM: int, BN: int, a_size: int, w_size: int) -> dict:
    """num_warps / num_stages of a [BM, 128] x [128, BN] tile loop (also used by moe_gemm)."""
    return dict(num_warps=8 if BM * BN >= 64 * 128 else 4,
                num_stages=stages(BM * BLOCK * a_size + BLOCK * BN * w_size))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def config(M: int, N: int, K: int, sms: int) -> tuple[int, int, int]:
    """(BM, BN, split-K) for an [M, K] x [K, N] product on `sms` multiprocessors."""
    BM = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    BN = 64                        # 128x128 spills on sm_90 (bench/triton_sm90.py); 128x64 does not
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    kb = triton.cdiv(K, BLOCK)
    split = 1
    if tiles < sms and kb >= 4:                   # too few tiles to fill the chip: split K
        split = min(kb // 2, triton.cdiv(2 * sms, tiles))
    return BM, BN, split


def fp8_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] (float, or e4m3 with x_scale [M, K/128]), w [N, K] e4m3, w_scale [N/128, K/128]
    -> y [M, N] in out_dtype (default x's dtype; bf16 for e4m3 x)."""
    M, K = x.shape
    N = w.shape[0]
    a_fp8 = x_scale is not None
    out_dtype = out_dtype or (torch.bfloat16 if a_fp8 else x.dtype)
    BM, BN, split = config(M, N, K, _sm_count(x.device))
    k_split = triton.cdiv(triton.cdiv(K, BLOCK), split) * BLOCK
    split = triton.cdiv(K, k_split)
    c = torch.empty(split, M, N, device=x.device, dtype=torch.float32 if split > 1 else out_dtype)
    xs = x_scale if a_fp8 else w_scale                                  # unused when not a_fp8
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), split)
    _fp8_gemm[grid](x, xs, w, w_scale, c, M, N, K, k_split,
                    x.stride(0), x.stride(1), xs.stride(0), xs.stride(1), w.stride(0), w.stride(1),
                    w_scale.stride(0), w_scale.stride(1), c.stride(0), c.stride(1), c.stride(2),
                    A_FP8=a_fp8, PREC="ieee" if x.dtype == torch.float32 else "tf32",
                    F32DOT=interpreted(x),
                    BM=BM, BN=BN, BK=BLOCK, **gemm_launch(BM, BN, x.element_size(), w.element_size()))
    return c[0] if split == 1 else c.sum(0).to(out_dtype)
