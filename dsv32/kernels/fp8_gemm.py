"""y = x W^T for FP8 e4m3 weights with 128x128 block scales, without dequantising W per call.

Modes (numerics):
  "w8a16": x stays in its dtype; W's e4m3 values are exact in bf16/fp32 and each block's scale
           multiplies the fp32 partial product (Triton kernel);
  "w8a8":  x quantised per 1x128 group to e4m3 (DeepSeek's deployment numerics, `fp8_act`), then
           `torch.nn.functional.scaled_mm` with BlockWise1x128 x BlockWise128x128 where the GPU and
           torch support it (probed once per device), else the Triton kernel.
Reference: `fp8_linear_ref` = dequantise + F.linear (what `Linear` does at every call).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dsv32.model.fp8 import FP8, FP8_MAX, act_quant_dequant, block_dequant

from . import check_backend

MODES = ("w8a16", "w8a8")


def fp8_linear_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, mode: str = "w8a16"
                   ) -> torch.Tensor:
    """Reference: x [..., K] (per-128 quantise-dequantised first in "w8a8") times the dequantised
    weight [N, K] -> [..., N] in x's dtype."""
    if mode == "w8a8":
        x = act_quant_dequant(x)
    return F.linear(x, block_dequant(w, w_scale, (128, 128), x.dtype))


def act_quant(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> e4m3 [M, K] and fp32 scales [M, K/group] (the math of `act_quant_dequant`)."""
    g = x.float().unflatten(-1, (-1, group))                             # [M, K/g, g]
    s = g.abs().amax(-1).clamp(min=1e-12) / FP8_MAX                      # [M, K/g]
    return (g / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8).flatten(-2), s


def _scaled_mm(xq, xs, w, ws, out_dtype, pad_k4: bool) -> torch.Tensor:
    """One blockwise scaled_mm; `pad_k4` pads the weight scales' K blocks to a multiple of 4
    (a layout some cuBLASLt versions ask for)."""
    M = xq.shape[0]
    if M % 4:                                                            # rows: a multiple of 4
        xq, xs = F.pad(xq.view(torch.uint8), (0, 0, 0, -M % 4)).view(FP8), F.pad(xs, (0, 0, 0, -M % 4), value=1.0)
    if pad_k4 and ws.shape[1] % 4:
        ws = F.pad(ws, (0, -ws.shape[1] % 4), value=1.0)
    y = F.scaled_mm(xq, w.t(), xs.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                    ws.t(), F.ScalingType.BlockWise128x128, output_dtype=out_dtype)
    return y[:M]


@functools.cache
def scaled_mm_variant(device: torch.device) -> str | None:
    """How blockwise `scaled_mm` runs on `device` ("plain" or "pad_k4"), or None where it does not
    (CPU, pre-SM90, older torch/CUDA): tried once on a small problem against the reference."""
    if device.type != "cuda" or not hasattr(F, "ScalingType") or \
            not hasattr(F.ScalingType, "BlockWise128x128") or torch.cuda.get_device_capability(device) < (9, 0):
        return None
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(5, 384, device=device, generator=g, dtype=torch.bfloat16)
    w = torch.randn(256, 384, device=device, generator=g).to(FP8)
    ws = torch.rand(2, 3, device=device, generator=g) + 0.5
    ref = fp8_linear_ref(x, w, ws, "w8a8").float()
    for variant in ("plain", "pad_k4"):
        try:
            y = _scaled_mm(*act_quant(x), w, ws, torch.bfloat16, variant == "pad_k4").float()
        except Exception:            # noqa: BLE001 - any failure (also another torch's signature) = unsupported
            continue
        if ((y - ref).norm() / ref.norm()).item() < 2e-2:
            return variant
    return None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, mode: str = "w8a16",
               backend: str = "torch") -> torch.Tensor:
    """x [..., K] @ FP8 weight [N, K] (scales [ceil(N/128), ceil(K/128)]) -> [..., N] in x's dtype.
    backend "torch" is the reference (CPU); "triton" uses the kernels (and scaled_mm for w8a8)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if check_backend(backend) == "torch":
        return fp8_linear_ref(x, w, w_scale, mode)
    from .triton.fp8_gemm import fp8_gemm
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if mode == "w8a16":
        y = fp8_gemm(x2, w, w_scale)
    else:
        if K % 128:
            raise ValueError(f"w8a8 needs K ({K}) a multiple of 128")
        xq, xs = act_quant(x2)
        variant = scaled_mm_variant(x.device) if w.shape[0] % 128 == 0 else None
        if variant is not None:
            y = _scaled_mm(xq, xs, w, w_scale, x.dtype, variant == "pad_k4")
        else:
            y = fp8_gemm(xq, w, w_scale, x_scale=xs, out_dtype=x.dtype)
    return y.view(*lead, w.shape[0])
