"""FP8 e4m3 quantisation: 128x128 weight blocks as DeepSeek ships them, 1x128 groups for the caches."""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0
CACHE_GROUP = 128               # FP8 caches: one fp32 scale per 128 values (the deployment layout)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(shape: tuple[int, int], block: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    """Shape of `weight_scale_inv` for a weight of `shape` (edge blocks included)."""
    return _ceil_div(shape[0], block[0]), _ceil_div(shape[1], block[1])


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Blow a per-block scale up to one value per weight element: [R/b0, C/b1] -> [R, C]."""
    s = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return s[: shape[0], : shape[1]]


def block_dequant(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128),
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Real weight = fp8 value x the fp32 scale of its block."""
    if w.dim() != 2:
        raise ValueError(f"block_dequant: expected a 2-D weight, got shape {tuple(w.shape)}")
    if tuple(scale.shape) != scale_shape(tuple(w.shape), block):
        raise ValueError(f"block_dequant: scale shape {tuple(scale.shape)} does not match weight "
                         f"{tuple(w.shape)} with blocks {block} (expected {scale_shape(tuple(w.shape), block)})")
    return (w.to(torch.float32) * _expand(scale.to(torch.float32), tuple(w.shape), block)).to(dtype)


def block_quant(w: torch.Tensor, block: tuple[int, int] = (128, 128), ue8m0: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D weight to fp8 with one scale per block (ue8m0: scales rounded up to powers of 2)."""
    rows, cols = w.shape
    nr, nc = scale_shape((rows, cols), block)
    pad = torch.zeros(nr * block[0], nc * block[1], dtype=torch.float32, device=w.device)
    pad[:rows, :cols] = w.float()
    blocks = pad.view(nr, block[0], nc, block[1])                      # [nr, b0, nc, b1]
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)              # [nr, nc]
    scale = amax / FP8_MAX
    if ue8m0:
        scale = torch.pow(2.0, torch.ceil(torch.log2(scale)))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nr * block[0], nc * block[1])[:rows, :cols].contiguous(), scale


def act_quant_dequant(x: torch.Tensor, group: int = 128, ue8m0: bool = False) -> torch.Tensor:
    """Simulate dynamic FP8 activation quantisation: per `group` elements of the last dim."""
    d = x.shape[-1]
    if d % group:
        raise ValueError(f"act_quant_dequant: last dim {d} is not a multiple of the group size {group}")
    g = x.float().unflatten(-1, (d // group, group))                     # [..., d/group, group]
    scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    if ue8m0:
        scale = torch.pow(2.0, torch.ceil(torch.log2(scale)))
    q = (g / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale
    return q.flatten(-2).to(x.dtype)


def quantize_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> fp8 values [..., d] and one fp32 scale per 128 values [..., d/128] (the FP8
    caches' layout)."""
    g = x.float().unflatten(-1, (-1, CACHE_GROUP))
    scale = g.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    q = (g / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2), scale


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`quantize_groups`' values and scales -> value x scale in fp32, then `dtype`."""
    return (q.float().unflatten(-1, (-1, CACHE_GROUP)) * scale.unsqueeze(-1)).flatten(-2).to(dtype)
