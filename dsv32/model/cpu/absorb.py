"""MLA's absorbed `kv_b_proj` for packed weights: `q_nope @ W_uk` into the latent space and
`o_lat @ W_uv^T` out of it, reading the packed weight [H*(nope+v), C] in place (one token: compiled
kernels over all heads; more: one dequantised tile of heads at a time, then einsum).

`absorb_reference` is the slow obvious reference: the whole weight dequantised, then einsum.
"""
from __future__ import annotations

import torch

from .compile import kernel, tracing
from .packed import TILE_ELEMS, dequantize


def _heads(w: torch.Tensor, scale: torch.Tensor | None, H: int) -> torch.Tensor:
    """Packed [H*(nope+v), C] (+ scales [H*(nope+v), C/G]) -> fp32 [H, nope+v, C] (in a kernel:
    fused into the reduction that reads it)."""
    C = w.shape[1]
    if scale is None:
        return w.float().view(H, -1, C)
    Gs = scale.shape[1]
    return (w.float().view(H, -1, Gs, C // Gs) * scale.view(H, -1, Gs, 1)).view(H, -1, C)


def _q_kernel(q_nope: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """q_nope [M, H, nope] -> [M, H, C]: sum over nope of q_nope x W_uk."""
    H, nope = q_nope.shape[1], q_nope.shape[2]
    w_uk = _heads(w, scale, H)[:, :nope]                                 # [H, nope, C]
    return (q_nope.unsqueeze(-1) * w_uk.unsqueeze(0)).sum(-2)


def _o_kernel(o_lat: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, nope: int) -> torch.Tensor:
    """o_lat [M, H, C] -> [M, H, v]: sum over C of o_lat x W_uv."""
    H = o_lat.shape[1]
    w_uv = _heads(w, scale, H)[:, nope:]                                 # [H, v, C]
    return (o_lat.unsqueeze(2) * w_uv.unsqueeze(0)).sum(-1)


def _tiled(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, nope: int, query: bool
           ) -> torch.Tensor:
    """Many tokens x [M, H, .]: dequantise a tile of heads at a time and einsum it."""
    M, H = x.shape[:2]
    per_head = w.shape[0] // H
    heads = max(1, TILE_ELEMS // (per_head * w.shape[1]))
    outs = []
    for h in range(0, H, heads):
        rows = slice(h * per_head, min(H, h + heads) * per_head)
        wh = dequantize(w[rows], None if scale is None else scale[rows]).view(-1, per_head, w.shape[1])
        if query:                                                        # [M, h, nope] x [h, nope, C]
            outs.append(torch.einsum("mhn,hnc->mhc", x[:, h:h + heads], wh[:, :nope]))
        else:                                                            # [M, h, C] x [h, v, C]
            outs.append(torch.einsum("mhc,hvc->mhv", x[:, h:h + heads], wh[:, nope:]))
    return torch.cat(outs, 1)


def absorb(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, nope: int, query: bool
           ) -> torch.Tensor:
    """query: q_nope [..., H, nope] -> [..., H, C]; else o_lat [..., H, C] -> [..., H, v]; fp32."""
    lead, H = x.shape[:-2], x.shape[-2]
    x3 = x.reshape(-1, H, x.shape[-1]).float().contiguous()              # [M, H, .]
    M = x3.shape[0]
    if tracing():               # traced into a larger graph (model/decode.py)
        y = _q_kernel(x3, w, scale) if query else _o_kernel(x3, w, scale, nope)
    elif M > 1:                 # prefill (its last few queries too: no shape to compile mid-request)
        y = _tiled(x3, w, scale, nope, query)
    else:
        key = (w.dtype, tuple(w.shape), H, nope)
        if query:
            y = kernel(_q_kernel, *key)(x3, w, scale)
        else:
            y = kernel(_o_kernel, *key)(x3, w, scale, nope)
    return y.reshape(*lead, H, y.shape[-1])


def absorb_reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, nope: int,
                     query: bool) -> torch.Tensor:
    """The slow obvious reference of `absorb`."""
    H = x.shape[-2]
    wh = dequantize(w, scale).view(H, -1, w.shape[1])
    if query:
        return torch.einsum("...hn,hnc->...hc", x.float(), wh[:, :nope])
    return torch.einsum("...hc,hvc->...hv", x.float(), wh[:, nope:])
