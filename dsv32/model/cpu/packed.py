"""Packed weights for fp32 compute: int8 with one fp32 scale per (row, 128 columns), or 16-bit
(bf16 / fp16). A matrix-vector product (decode: a few rows of activations) runs a dequantise-and-
reduce kernel that reads every stored byte once and never materialises a dequantised weight (the
native one of native.py where the shapes allow, else a compiled one); a matrix-matrix product
(prefill) dequantises one cache-sized tile of output rows at a time into fp32 and multiplies it
(fp32 GEMM: exact; or, where asked for, bf16 GEMM, ~2.3x faster on CPUs with AVX512-BF16 or AMX
and far slower on others).

`dequantize` is the slow obvious reference: the whole weight in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native
from .build import has_compiler
from .compile import dynamic, kernel, tracing

GROUP = 128                # int8: one scale per GROUP columns of a row
GEMV_MAX_ROWS = 32         # activation rows up to which the dequantise-and-reduce kernel runs (on
                           # AMX tiles: native.AMX_MAX_M; bench/README.md, "Weight-format kernels")
COMPILED_GEMV_MAX_ROWS = 8  # ... and the compiled one, for shapes the native one does not take
TILE_ROWS = 512            # GEMM path: output rows of one dequantised tile (fewer make the fp32 GEMM
                           # pack the activations again for each tile: 128 rows ran 2-3x slower)
TILE_ELEMS = 1 << 21       # ... and at most this many fp32 elements (8 MiB): long rows split along K
NATIVE_IN_GRAPH = 1 << 20  # weight elements from which a traced graph calls the native GEMV (its
                           # dispatch costs ~10 us; below, the graph's own fused reduction is cheaper)
HALF = (torch.bfloat16, torch.float16)


def group_size(cols: int) -> int:
    """Columns sharing one int8 scale: GROUP, or the whole row when GROUP does not divide it."""
    return GROUP if cols % GROUP == 0 else cols


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> int8 values [N, K] and fp32 scales [N, K/G] (symmetric, round to nearest):
    real weight ~= value x the scale of its group."""
    N, K = w.shape
    G = group_size(K)
    g = w.float().view(N, K // G, G)                                     # [N, K/G, G]
    s = g.abs().amax(-1) / 127.0                                         # [N, K/G]
    q = (g / s.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)).round_().clamp_(-127, 127)
    return q.to(torch.int8).view(N, K), s


def dequantize(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: the packed weight [N, K] in `dtype` (or written into `out`, contiguous fp32 [N, K])."""
    if out is not None:
        out.copy_(w)
    elif w.dtype != torch.int8:
        return w.to(dtype)
    else:
        out = w.float()                                                  # [N, K], then scaled in place
    if scale is not None:
        out.view(w.shape[0], scale.shape[1], -1).mul_(scale.unsqueeze(-1))
    return out.to(dtype)


# ---- decode: dequantise-and-reduce kernels (compiled) ------------------------------------------

def _gemv_int8(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32, q [N, K] int8, s [N, K/G] -> y^T [N, M]: weight row n is read once for all M."""
    N, K = q.shape
    M, Gs = x.shape[0], s.shape[1]
    part = (x.view(1, M, Gs, K // Gs) * q.view(N, 1, Gs, K // Gs).float()).sum(-1)   # [N, M, K/G]
    return (part * s.view(N, 1, Gs)).sum(-1)                                         # [N, M]


def _gemv_half(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32, w [N, K] bf16/fp16 -> y^T [N, M]."""
    N, K = w.shape
    return (x.view(1, -1, K) * w.view(N, 1, K).float()).sum(-1)


def _gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """One compiled kernel per weight shape, the activation rows M dynamic above 1."""
    M = x.shape[0]
    key = (w.dtype, *w.shape, scale.shape[1] if scale is not None else 0, M == 1)
    if M > 1:
        dynamic(x, 0)
    if scale is None:
        return kernel(_gemv_half, *key)(x, w).t()
    return kernel(_gemv_int8, *key)(x, w, scale).t()


# ---- prefill: tiled dequantise + fp32 GEMM --------------------------------------------------------

def _tiles(w: torch.Tensor, scale: torch.Tensor | None, rows: int, elems: int):
    """The packed weight W [N, K] dequantised one tile of [rows, cols] at a time (cols: all K where
    rows x K fits `elems`, else a multiple of the int8 group): yields (r, c, tile fp32), each tile
    in the same buffer (a fresh 4 MB tile page-faults each call)."""
    N, K = w.shape
    G = K if scale is None else K // scale.shape[1]
    rows = min(N, rows)
    cols = min(K, max(G, elems // rows // G * G))
    buf = torch.empty(rows * cols, device=w.device)
    for r in range(0, N, rows):
        for c in range(0, K, cols):
            s = None if scale is None else scale[r:r + rows, c // G:(c + cols) // G]
            wt = w[r:r + rows, c:c + cols]
            yield r, c, dequantize(wt, s, out=buf[:wt.numel()].view(wt.shape))      # [rows, cols]


def _gemm_tiled(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, rows: int = TILE_ROWS,
                elems: int = TILE_ELEMS) -> torch.Tensor:
    """x [M, K] fp32 -> [M, N], one dequantised tile of weights at a time (`_tiles`), the products
    of a row's tiles accumulated."""
    out_t = x.new_empty(w.shape[0], x.shape[0])                          # y^T [N, M]
    for r, c, tile in _tiles(w, scale, rows, elems):
        o, xt = out_t[r:r + tile.shape[0]], x[:, c:c + tile.shape[1]].t()   # xt [cols, M]
        torch.mm(tile, xt, out=o) if c == 0 else o.addmm_(tile, xt)
    return out_t.t()


def _gemm_bf16(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, rows: int = TILE_ROWS,
               elems: int = TILE_ELEMS) -> torch.Tensor:
    """x [M, K] fp32 -> [M, N] by torch's bf16 GEMM (PREFILL_DTYPES bfloat16): x and the weight
    rounded to bf16 (a bf16 weight multiplied in place, others dequantised a tile at a time as in
    _gemm_tiled), fp32 sums, each tile's products rounded to bf16 and summed in fp32 along K."""
    xb = x.to(torch.bfloat16)
    if w.dtype == torch.bfloat16:
        return F.linear(xb, w).float()
    out = x.new_zeros(x.shape[0], w.shape[0])                            # [M, N]
    for r, c, tile in _tiles(w, scale, rows, elems):
        out[:, r:r + tile.shape[0]] += F.linear(xb[:, c:c + tile.shape[1]], tile.to(torch.bfloat16))
    return out


def _gemm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A packed weight's product with many rows, in `dtype` (PREFILL_DTYPES)."""
    return _gemm_tiled(x, w, scale) if dtype == torch.float32 else _gemm_bf16(x, w, scale)


def _rows(x2: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x2 [M, K] fp32 -> x2 W^T [M, N], for a W (packed, or plain fp32) that native.supports: the
    native GEMV up to GEMV_MAX_ROWS rows (or on AMX tiles), else the tiled GEMM (packed, its
    products in `dtype`) or torch's BLAS (fp32). The rows' count is known here, also inside a
    traced graph (dsv32::linear_rows, always fp32)."""
    if x2.shape[0] == 0:
        return x2.new_empty(0, w.shape[0])
    if x2.shape[0] <= GEMV_MAX_ROWS or native.on_amx(x2, w, scale):
        return native.gemv_unchecked(x2, w, scale)
    return F.linear(x2, w) if w.dtype == torch.float32 else _gemm(x2, w, scale, dtype)


# `_rows` as the operator dsv32::linear_rows, so traced graphs can call it. A plain library
# definition with a CPU kernel (~2 us of dispatch; torch.library.custom_op's wrappers cost ~40 us).
_LIB = torch.library.Library("dsv32", "DEF")
_LIB.define("linear_rows(Tensor x, Tensor w, Tensor? scale) -> Tensor")
_LIB.impl("linear_rows", _rows, "CPU")


@torch.library.register_fake("dsv32::linear_rows")
def _(x, w, scale):
    return x.new_empty(x.shape[0], w.shape[0])


def packed_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None,
                  bias: torch.Tensor | None = None, prefill_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y = x W^T (+ bias) for a packed weight W [N, K]; computed in fp32 (over GEMV_MAX_ROWS rows,
    outside traced graphs: the tiled GEMM's products in `prefill_dtype`), returned in x's dtype."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K).float()                                        # [M, K]
    if tracing():               # traced into a larger graph (model/decode.py)
        one_row = isinstance(x2.shape[0], int) and x2.shape[0] == 1     # else a batch graph's dynamic rows
        if (w.numel() >= NATIVE_IN_GRAPH or not one_row) and native.supports(x2, w, scale):
            y = torch.ops.dsv32.linear_rows(x2, w, scale)
        else:
            y = (_gemv_half(x2, w) if scale is None else _gemv_int8(x2, w, scale)).t()
    elif native.supports(x2, w, scale):
        y = _rows(x2, w, scale, prefill_dtype)
    elif x2.shape[0] == 0:
        y = x2.new_empty(0, w.shape[0])
    elif x2.shape[0] <= COMPILED_GEMV_MAX_ROWS:
        y = _gemv(x2.contiguous(), w, scale)
    else:
        y = _gemm(x2, w, scale, prefill_dtype)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, w.shape[0]).to(x.dtype)


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for a plain weight: fp32 rows on the CPU up to GEMV_MAX_ROWS (decode: a
    step's LM head, a batch's projections) through the native GEMV, whose fp32 loop reads at the
    memory's rate where torch's BLAS (MKL) reads 3-9 GB/s at these row counts on AMD CPUs
    (bench/README.md, "dsv32 vs llama.cpp"), also inside a traced batch graph; else (and under
    autograd) F.linear."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if w.dtype != torch.float32 or not w.is_contiguous() or torch.is_grad_enabled() or not native.supports(x2, w, None):
        return F.linear(x, w, bias)
    if tracing():               # a decode graph (model/decode.py: traced where a compiler is at hand)
        one_row = isinstance(x2.shape[0], int) and x2.shape[0] == 1
        if one_row and w.numel() < NATIVE_IN_GRAPH:
            return F.linear(x, w, bias)
        y = torch.ops.dsv32.linear_rows(x2, w, None)
    elif x2.shape[0] > GEMV_MAX_ROWS or not has_compiler():
        return F.linear(x, w, bias)
    else:
        y = native.gemv_unchecked(x2, w, None)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w.shape[0])


def packed_linear_reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """The slow obvious reference of `packed_linear`: dequantise all of W, then F.linear in fp32."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), dequantize(w, scale), b).to(x.dtype)


def embedding_rows(ids: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of a packed embedding table, dequantised to `dtype` (only those rows are read)."""
    rows = F.embedding(ids, w).to(dtype)                                 # [..., D]
    if scale is None:
        return rows
    s = F.embedding(ids, scale).to(dtype)                                # [..., D/G]
    return (rows.unflatten(-1, (s.shape[-1], -1)) * s.unsqueeze(-1)).flatten(-2)
