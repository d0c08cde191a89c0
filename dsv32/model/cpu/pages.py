"""The cache pools the native kernels read and write in place (native.py): one row's keys as
`Pages`, the layouts cache_rows.cpp knows, and the pool arguments of the kernels' C signatures."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..fp8 import CACHE_GROUP as GROUP, FP8

NONE = torch.empty(0)       # the pointer arguments of the layouts not in use
# a pool's arguments in the kernels' C signatures (`pool_args`): fp32 values, e4m3 values, their
# scales, bf16 values (an FP8 latent's: its rope)
POOL_ARGS = ["float*", "uint8_t*", "float*", "uint16_t*"]


class Pages(NamedTuple):
    """One row's keys in a key store's own storage, read and written in place: key position s is
    row `table[s // block] * block + s % block` of every pool; a contiguous store is one block,
    table [0]. The pools are fp32 or bf16 (latent [N, C+R], index [N, Di]) or FP8 (engine/cache.py's
    layout: latent e4m3 [N, C] with latent_scale [N, C/128] and bf16 rope [N, R], index e4m3 [N, Di]
    with index_scale [N, Di/128]); all contiguous."""

    latent: torch.Tensor
    index: torch.Tensor
    table: torch.Tensor     # [nb] int64
    block: int
    latent_scale: torch.Tensor | None = None
    rope: torch.Tensor | None = None
    index_scale: torch.Tensor | None = None


LAYOUTS = {torch.float32: 0, FP8: 1, torch.bfloat16: 2}   # a latent pool's dtype -> cache_rows.cpp's rows_of


def pools_ok(p: Pages, D: int, Di: int, C: int) -> bool:
    """Whether the pools of `p` have the layout `Pages` describes for these sizes."""
    pools = [t for t in (p.latent, p.index, p.latent_scale, p.rope, p.index_scale) if t is not None]
    if not all(t.dim() == 2 and t.is_contiguous() for t in pools):
        return False
    if p.latent.dtype in (torch.float32, torch.bfloat16):
        return (len(pools) == 2 and p.index.dtype == p.latent.dtype and p.latent.shape[1] == D
                and p.index.shape[1] == Di)
    N = p.latent.shape[0]
    return (len(pools) == 5 and p.latent.dtype == p.index.dtype == FP8 and p.rope.dtype == torch.bfloat16
            and p.latent_scale.dtype == p.index_scale.dtype == torch.float32 and C % GROUP == 0 and Di % GROUP == 0
            and all(t.shape[0] == N for t in pools) and p.latent.shape[1] == C and p.rope.shape[1] == D - C
            and p.latent_scale.shape[1] == C // GROUP and p.index.shape[1] == Di and p.index_scale.shape[1] == Di // GROUP)


def index_args(index: torch.Tensor, scale: torch.Tensor | None) -> list[torch.Tensor]:
    """An index pool's POOL_ARGS (NONE where its layout, LAYOUTS[index.dtype], has none)."""
    layout = LAYOUTS[index.dtype]
    if layout == 0:
        return [index, NONE, NONE, NONE]
    return [NONE, index, scale, NONE] if layout == 1 else [NONE, NONE, NONE, index]


def pool_args(p: Pages) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """The latent's and the index's POOL_ARGS (NONE where the layout has none) and the layout's
    number (LAYOUTS)."""
    layout = LAYOUTS[p.latent.dtype]
    if layout == 0:
        lat = [p.latent, NONE, NONE, NONE]
    else:
        lat = [NONE, p.latent, p.latent_scale, p.rope] if layout == 1 else [NONE, NONE, NONE, p.latent]
    return lat, index_args(p.index, p.index_scale), layout
