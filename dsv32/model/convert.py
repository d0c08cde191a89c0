"""Storing one checkpoint tensor into a parameter: dequantising FP8 blocks, quantising to FP8 or to
packed int8, or copying, a few row blocks at a time."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig
from .cpu.packed import quantize_int8
from .fp8 import FP8, block_dequant, block_quant
from .layout import CheckpointError


def dequant_into(dst: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                 block: tuple[int, int], chunk: int = 1 << 24, offset: tuple[int, int] = (0, 0)) -> None:
    """dst = w x the scale of its block, in chunks of whole row-blocks (fp32 temporaries of at most
    about `chunk` elements, few kernels per tensor). `offset`: where `w` starts inside the first
    block of `scale` (a tensor-parallel slice that does not begin on a block boundary)."""
    rows, cols = w.shape
    r0, c0 = offset
    w, scale = w.to(dst.device), scale.to(dst.device, torch.float32)
    step = block[0] * max(1, chunk // (block[0] * cols))                   # rows per chunk
    r = 0
    while r < rows:
        g = r + r0                                                          # row in the scale grid
        end = min(rows, (g // block[0]) * block[0] + step - r0)
        s = scale[g // block[0]: -(-(end + r0) // block[0])]                # [blocks, cols/b1]
        s = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        s = s[g % block[0]: g % block[0] + end - r, c0: c0 + cols]
        dst[r:end].copy_(w[r:end].float() * s)
        r = end


def quantize_into(dst: torch.Tensor, dst_scale: torch.Tensor, w: torch.Tensor,
                  scale: torch.Tensor | None, block, offset: tuple[int, int], fp8_first: bool,
                  chunk: int = 1 << 20) -> None:
    """dst, dst_scale = int8 groups of the real weight (FP8 blocks dequantised exactly first;
    `fp8_first`: a plain weight is block-quantised to e4m3 first), a few row blocks at a time so
    the fp32 temporaries stay near `chunk` elements."""
    rows, cols = w.shape
    step = block[0] * max(1, chunk // (block[0] * cols))
    for r in range(0, rows, step):
        end = min(rows, r + step)
        if scale is None:
            real = w[r:end].float()
            if fp8_first:                   # r is a multiple of block[0]: the blocks are the same
                real = block_dequant(*block_quant(real, block), block)
        else:
            g = offset[0] + r                                               # row in the scale grid
            real = torch.empty(end - r, cols)
            dequant_into(real, w[r:end], scale[g // block[0]:], block, offset=(g % block[0], offset[1]))
        dst[r:end], dst_scale[r:end] = quantize_int8(real)


def copy_into(dst: torch.Tensor, dst_scale: torch.Tensor | None, w: torch.Tensor,
              scale: torch.Tensor | None, block, cfg: ModelConfig, name: str, file: Path,
              shard=None, fp8_first: bool = False) -> None:
    """Store a checkpoint tensor into a parameter, converting between FP8, plain and packed
    storage (`fp8_first`: see quantize_into)."""
    offset = (0, 0)
    if shard is not None and scale is not None:
        offset = (shard[1] % block[0], 0) if shard[0] == 0 else (0, shard[1] % block[1])
    if dst.dtype == torch.int8:                     # packed int8 (weight_format int8 / fp8)
        quantize_into(dst, dst_scale, w, scale, block, offset, fp8_first)
    elif dst.dtype == FP8:                            # FP8 storage mode
        if scale is not None and (offset != (0, 0) or tuple(scale.shape) != tuple(dst_scale.shape)):
            raise CheckpointError(f"tensor {name} in {file}: its tensor-parallel slice {shard} does not "
                                  f"fall on {block[0]}x{block[1]} scale blocks; FP8 storage needs "
                                  f"block-aligned shards (load with fp8_storage=False)")
        if scale is None:                           # plain weight on disk: quantise it here
            ue8m0 = bool(cfg.quantization_config and cfg.quantization_config.scale_fmt == "ue8m0")
            w, scale = block_quant(w.float(), block, ue8m0=ue8m0)
        dst.copy_(w)
        dst_scale.copy_(scale)
    elif scale is not None:                         # dequantise into the compute dtype
        dequant_into(dst, w, scale, block, offset=offset)
    else:
        dst.copy_(w)
