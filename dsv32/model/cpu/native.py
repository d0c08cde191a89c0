"""Native decode kernels (C++ beside this file, built on first use by build.py):

  gemv.cpp              the packed-weight GEMV: reads int8 / fp16 / bf16 weights (and fp32: a
                        decode step's LM head, packed.dense_linear) at the memory's bandwidth with
                        fp32 activations, where inductor's generated reduction reaches ~60% of it
                        on large matrices (bench/README.md, "Weight-format kernels"); rows of
                        4096+ columns four at a time. Called directly (eager decode, the LM head); inside a traced
                        graph through the operator `dsv32::linear_rows` (packed.py: ~2 us of
                        dispatch, so a one-row graph uses it for large matrices only). Reference:
                        packed.packed_linear_reference.
  amx_gemv.cpp          the int8 and bf16 GEMVs on AMX tiles, where the CPU has them
                        (`amx_ready`): the activations split into three limbs of the weights' type,
                        the products summed by the tile unit, so no conversion instructions bound
                        the stream (~20% faster on large matrices). Reference: the same.
  (vec.h: the float vector operations both use, for AVX-512, AVX2 or plain C)
  decode_attention.cpp  one decode row's attention in one call, over the cache read and written in
                        place through the row's block table (`Pages`): the new token's cache write,
                        the indexer's scores over every earlier key and their top-k
                        (index_topk.cpp), the absorbed attention over the selected latent rows
                        (sparse_attention.cpp). Instead of a cache write, slot arithmetic, a gather
                        and ~20 eager ops. The pools are fp32, bf16 or the FP8 layout
                        (cache_rows.cpp rounds, quantises and converts their rows as
                        engine/cache.py does). Reference:
                        KV.write, MLA.decode_select, MLA.attend_latent.
  amx_index.cpp         the indexer's scores over an FP8 or bf16 pool on AMX-BF16 tiles, where the
                        CPU has them: each e4m3 key byte looked up as the bf16 of its exact value
                        (bf16 keys are tiles as they lie), the query
                        in three bf16 limbs (as amx_gemv.cpp), so the scores are as exact as fp32's
                        while the vector unit no longer spends H * D / 16 FMAs a key; it converts
                        the next batch's keys while the tiles multiply this one (per layer at 8-64K
                        keys 1.7-2.2x faster with 8 index heads, 3.5-4.6x with 64: bench/README.md).
                        `index_scores` exposes the scores alone.
                        Reference: Indexer.scores over the dequantised keys.
  amx_index_rows.cpp    the same for a prefill's queries over a run of consecutive FP8 or bf16 keys
                        (`index_scores_rows`, which cpu/indexer.index_scores takes for such runs): a
                        GEMM on tiles where the CPU path dequantises and multiplies in fp32.
  amx_attention.cpp     the sparse attention (decode_attention's and sparse_prefill's) over a bf16
                        or FP8 pool on AMX-BF16 tiles, where the CPU has them, with 16+ heads and
                        64+ rows: scores and weighted sums as GEMMs on tiles (the query and the
                        softmax's probabilities in three bf16 limbs), where the vector code's FMAs
                        ran at ~40 GFLOP/s with 128 heads (1.3-5.4x faster a call, bench/README.md
                        "Sparse attention kernels"). Reference: MLA.attend_latent.
  sparse_prefill.cpp    the sparse attention of a prefill's queries, each over its own selected rows
                        read in place (sparse_attention.cpp's per-query loop, OpenMP over the
                        queries), where the reference gathers [t, K, C+R] rows for batched matmuls.
                        Reference: MLA.attend_latent.
  layer.cpp             a block's decode row in two calls (layer_attn.cpp: norms, projections, ropes,
  layer_attn.cpp        the absorbed query, then decode_attention.cpp's row; layer_ffn.cpp: W_uv,
  layer_ffn.cpp         o_proj, the MLP or the MoE with its router), the weights read by
                        amx_gemv.cpp's tile blocks (int8, bf16, where the CPU has AMX) or gemv.cpp's
                        row_dot; built and called by cpu/layer.py. Reference: the eager Block.
  topk_rows.cpp         the prefill indexer's causal top-k of many query rows at once (OpenMP over
                        the rows). It and index_topk.cpp select with top_ids.cpp: a threshold
                        from a sample of the row, one vectorised pass keeping the ids above it, an
                        exact selection among those (~0.5 ns a score; torch.topk 2-5). Reference:
                        indexer.causal_topk_reference.
"""
from __future__ import annotations

import ctypes
import functools
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..fp8 import CACHE_GROUP, FP8
from . import build
from .build import KernelError
from .pages import LAYOUTS, NONE, POOL_ARGS, Pages, index_args, pool_args, pools_ok

DEFINES = {torch.int8: "INT8", torch.float16: "HALF_FP16", torch.bfloat16: "HALF_BF16", torch.float32: "FP32"}
ALIGN = 32                  # K (and the int8 group size) must be multiples of this
_built: dict[tuple, Callable] = {}
# the C signatures of each kernel's entry point (pointers to tensors' data, then sizes)
GEMV_ARGS = {torch.int8: ["const float*", "const int8_t*", "const float*", "float*"] + ["const int64_t"] * 4,
             torch.float16: ["const float*", "const uint16_t*", "float*"] + ["const int64_t"] * 3}
GEMV_ARGS[torch.bfloat16] = GEMV_ARGS[torch.float16]
GEMV_ARGS[torch.float32] = ["const float*", "const float*", "float*"] + ["const int64_t"] * 3
DECODE_ATTENTION_ARGS = (["const float*"] * 5 + POOL_ARGS * 2 + ["const int64_t*", "float*", "int64_t*", "float*"]
                         + ["const int64_t"] * 9 + ["const float"])
SPARSE_PREFILL_ARGS = (["const float*", "const int64_t*"] + POOL_ARGS + ["const int64_t*", "float*"]
                       + ["const int64_t"] * 7 + ["const float"])
INDEX_SCORES_ARGS = ["const float*"] * 2 + POOL_ARGS + ["const int64_t*", "float*"] + ["const int64_t"] * 5
INDEX_ROWS_ARGS = ["const float*"] * 2 + ["const uint8_t*", "const float*", "float*"] + ["const int64_t"] * 5
INDEX_FILES = ("cache_rows.cpp", "top_ids.cpp", "amx_index.cpp", "index_topk.cpp")   # and the entry's file
ATTENTION_FILES = ("amx_attention.cpp", "sparse_attention.cpp")          # after cache_rows.cpp, amx_index.cpp
HEAD_SUM_ARGS = ["const float*", "const float*", "float*"] + ["const int64_t"] * 4
TOPK_ROWS_ARGS = ["const float*", "const int64_t*", "int64_t*"] + ["const int64_t"] * 3
GROUP = CACHE_GROUP         # FP8 pools: one fp32 scale per GROUP values (cache_rows.cpp's GROUP)


def supports(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> bool:
    """Whether `gemv` computes x [M, K] fp32 with the packed (or fp32) weight w [N, K] on this device."""
    K = w.shape[1]
    return (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype in DEFINES and K % ALIGN == 0
            and (scale is None) == (w.dtype != torch.int8)
            and (scale is None or (K // scale.shape[1]) % ALIGN == 0))


def _build(files: tuple[str, ...], defines: list[str], args: list[str]) -> Callable:
    """The `kernel` of `files` (beside this module, in order, after vec.h) with `defines`, as a
    Python callable (build.py: compiled once, then read from its disk cache)."""
    key = (*files, *defines)
    f = _built.get(key)
    if f is None:
        here = Path(__file__).parent
        source = "".join(f"#define {d}\n" for d in defines) + "".join((here / name).read_text() for name in ("vec.h", *files))
        f = _built[key] = build.load(source, args, f"dsv32/model/cpu/{files[-1]}")
    return f


AMX = "amx"                 # the `isa` of the GEMV on AMX tiles (amx_gemv.cpp): int8 and bf16 weights
AMX_ROWS, AMX_PASS_M, AMX_MAX_M = 16, 15, 60  # ... which needs N >= 16 weight rows and int8 groups of
                           # 64k; it reads W once for up to 15 activation rows, in passes up to 60
                           # (still faster than the tiled GEMM: bench/README.md, "Weight-format kernels")
AMX_FLAGS = {torch.int8: ("amx_tile", "amx_int8"), torch.bfloat16: ("amx_tile", "amx_bf16", "avx512_bf16")}
_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158


@functools.cache
def _tile_permission() -> bool:
    """Ask Linux (once) to let this process use the AMX tile data."""
    if ctypes.CDLL(None).syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0:
        return True
    warnings.warn("the CPU has AMX but Linux refused this process its tile data (arch_prctl): the AMX "
                  "kernels (GEMV, indexer) run their AVX-512 code", stacklevel=3)
    return False


def _has_amx(dtype: torch.dtype) -> bool:
    """Whether the CPU has AMX for `dtype` (int8, bf16) and Linux lets this process use the tile data."""
    return dtype in AMX_FLAGS and set(AMX_FLAGS[dtype]) <= build.cpu_flags() and _tile_permission()


@functools.cache
def amx_ready(dtype: torch.dtype = torch.int8) -> bool:
    """Whether the GEMV of `dtype` weights (int8, bf16) runs on AMX tiles here: the CPU has them,
    Linux lets this process use the tile data, and the kernel builds."""
    if not _has_amx(dtype):
        return False
    try:
        binding(dtype, AMX)
    except KernelError as e:
        warnings.warn(f"the {dtype} GEMV runs its AVX-512 code, not the AMX one: {e}", stacklevel=2)
        return False
    return True


def binding(dtype: torch.dtype, isa: int | str | None = None) -> Callable:
    """The built GEMV for weights of `dtype`; `isa` 512 / 256 / 1 forces AVX-512, AVX2 or the
    scalar code (default: the best the compiler targets on this machine), AMX the tile kernel."""
    if isa == AMX:
        return _build(("gemv.cpp", "amx_gemv.cpp"), [DEFINES[dtype], "AMX"], GEMV_ARGS[dtype])
    return _build(("gemv.cpp",), [DEFINES[dtype]] + ([] if isa is None else [f"ISA {isa}"]), GEMV_ARGS[dtype])


def on_amx(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> bool:
    """Whether `gemv(x, w, scale)` runs on AMX tiles here."""
    return supports(x, w, scale) and _takes_amx(x.shape[0], w, scale)


def _takes_amx(M: int, w: torch.Tensor, scale: torch.Tensor | None) -> bool:
    """Whether the AMX kernel takes M activation rows with this weight here (shapes, then the CPU)."""
    if M > AMX_MAX_M or w.shape[0] < AMX_ROWS:
        return False
    fits = w.dtype == torch.bfloat16 or (w.dtype == torch.int8 and (w.shape[1] // scale.shape[1]) % 64 == 0)
    return fits and amx_ready(w.dtype)


def decode_attention(latent: torch.Tensor, index_k: torch.Tensor, q: torch.Tensor, iq: torch.Tensor,
                     iw: torch.Tensor, pages: Pages, S: int, topk: int, scale: float, C: int,
                     isa: int | None = None) -> torch.Tensor:
    """One decode row at key position S - 1: write its latent [C+R] and indexer key [Di] into
    `pages`, select its keys (all while S <= topk, else the top-k of `sum_h iw[h] relu(iq[h] .
    key)`, ties to the lower id) and attend with the absorbed queries q [H, C+R] -> o_lat [H, C]
    (the softmax(scale q . row) weighted sum of row[:C] over the selected rows). `isa`: as for
    `binding`."""
    (H, D), (Hi, Di) = q.shape, iq.shape
    table, block = pages.table, pages.block
    ok = (all(t.dtype == torch.float32 for t in (latent, index_k, q, iq, iw)) and latent.numel() == D
          and index_k.numel() == Di and C <= D and pools_ok(pages, D, Di, C) and table.dtype == torch.int64
          and table.is_contiguous() and block > 0 and 0 < S <= table.numel() * block and topk > 0)
    if not ok:
        layout = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in pages if isinstance(t, torch.Tensor))
        raise ValueError(f"native decode_attention: unsupported shapes or dtypes: q {tuple(q.shape)} {q.dtype}, "
                         f"latent {tuple(latent.shape)}, iq {tuple(iq.shape)}, C {C}, pools and table {layout} "
                         f"(fp32, bf16, or FP8 as cpu/pages.Pages describes; contiguous) of {block}-key blocks "
                         f"for {S} keys")
    lat, ik, layout = pool_args(pages)
    f = _build(INDEX_FILES + ATTENTION_FILES + ("decode_attention.cpp",), _index_defines(isa, layout > 0),
               DECODE_ATTENTION_ARGS)
    o, scores, ids = q.new_empty(H, C), q.new_empty(S), torch.empty(min(S, topk), dtype=torch.int64)
    f(latent.contiguous(), index_k.contiguous(), q.contiguous(), iq.contiguous(), iw.contiguous(), *lat, *ik, table,
      scores, ids, o, H, D, C, Hi, Di, S, topk, block, layout, float(scale))
    return o


@functools.cache
def _amx_index_ready() -> bool:
    """Whether the indexer scores FP8 pools on AMX tiles here: the CPU has AMX-BF16 (and VBMI's byte
    lookups), Linux lets this process use the tile data, and amx_index.cpp builds."""
    if not (_has_amx(torch.bfloat16) and "avx512vbmi" in build.cpu_flags()):
        return False
    try:
        _build(INDEX_FILES + ("index_scores.cpp",), ["AMX"], INDEX_SCORES_ARGS)
    except KernelError as e:
        warnings.warn(f"the indexer scores FP8 caches with its AVX-512 code, not on AMX tiles: {e}", stacklevel=3)
        return False
    return True


def _index_defines(isa: int | str | None, tiled: bool) -> list[str]:
    """The build of the indexer's kernels: AMX (amx_index.cpp scores FP8 and bf16 pools on tiles) by
    default for those pools (`tiled`) where `_amx_index_ready`, or as `isa` asks."""
    if isa == AMX or (isa is None and tiled and _amx_index_ready()):
        return ["AMX"]
    return [] if isa is None else [f"ISA {isa}"]


def index_scores(iq: torch.Tensor, iw: torch.Tensor, pages: Pages, S: int, isa: int | str | None = None
                 ) -> torch.Tensor:
    """The scores decode_attention selects its top-k from: `sum_h iw[h] relu(iq[h] . key_s)` for
    iq [Hi, Di], iw [Hi] fp32 over the first S keys of `pages` (fp32; bf16 or FP8: on AMX tiles
    where the CPU has AMX-BF16) -> [S] fp32. `isa`: as for `binding`."""
    (Hi, Di), ik, ik_scale = iq.shape, pages.index, pages.index_scale
    fp8 = ik.dtype == FP8
    pool_ok = (ik.dim() == 2 and ik.is_contiguous() and ik.shape[1] == Di and (ik.dtype in LAYOUTS if not fp8 else
               Di % GROUP == 0 and ik_scale.dtype == torch.float32 and ik_scale.is_contiguous()
               and ik_scale.shape == (ik.shape[0], Di // GROUP)))
    if not (iq.dtype == iw.dtype == torch.float32 and iw.shape == (Hi,) and pool_ok and pages.table.dtype == torch.int64
            and pages.block > 0 and 0 < S <= pages.table.numel() * pages.block and (isa != AMX or Hi <= 64)):
        raise ValueError(f"native index_scores: unsupported iq {tuple(iq.shape)} {iq.dtype}, iw {tuple(iw.shape)}, "
                         f"index pool {tuple(pages.index.shape)} {pages.index.dtype} for {S} keys (AMX: Hi <= 64)")
    scores = iq.new_empty(S)
    layout = LAYOUTS[ik.dtype]
    _build(INDEX_FILES + ("index_scores.cpp",), _index_defines(isa, layout > 0), INDEX_SCORES_ARGS)(
        iq.contiguous(), iw.contiguous(), *index_args(ik, ik_scale), pages.table.contiguous(), scores, Hi, Di, S,
        pages.block, layout)
    return scores


def _rows_fit(q: torch.Tensor, values: torch.Tensor, scales: torch.Tensor | None) -> bool:
    """Whether `index_scores_rows` can score these queries [t, H, Di] over these FP8 (with scales) or
    bf16 keys here."""
    keys_ok = (scales is not None and values.dtype == FP8 and scales.shape == (values.shape[0], 1)
               and scales.is_contiguous()) or (scales is None and values.dtype == torch.bfloat16)
    return (q.device.type == "cpu" and q.dim() == 3 and q.shape[1] <= 64 and q.shape[2] == GROUP and keys_ok
            and values.dim() == 2 and values.shape[1] == GROUP and values.is_contiguous() and _amx_index_ready())


def takes_rows(q: torch.Tensor, values: torch.Tensor, scales: torch.Tensor | None) -> bool:
    """Whether cpu/indexer.index_scores scores a prefill's queries over a run of FP8 or bf16 keys
    with `index_scores_rows`: where it can, with 16+ index heads (a tile's width; with fewer it is no
    faster than converting for the fp32 GEMM, bench/README.md "Indexer kernels")."""
    return q.dim() == 3 and q.shape[1] >= 16 and _rows_fit(q, values, scales)


def index_scores_rows(q: torch.Tensor, w: torch.Tensor, values: torch.Tensor, scales: torch.Tensor | None,
                      out: torch.Tensor) -> None:
    """The indexer's scores of a prefill's queries q [t, H, Di] (w [t, H]) over n consecutive keys
    (FP8: values [n, Di] e4m3, scales [n, 1]; bf16: values [n, Di], scales None) on AMX tiles
    (amx_index_rows.cpp), written into out [t, n] (rows may be apart): `sum_h w[i, h] relu(q[i, h] .
    key_s)`. Needs AMX-BF16, H <= 64, Di = 128."""
    (t, H, _), n = q.shape, values.shape[0]
    if not (_rows_fit(q, values, scales) and w.shape == (t, H) and out.shape == (t, n) and out.stride(1) == 1
            and out.dtype == torch.float32):
        raise ValueError(f"native index_scores_rows: unsupported q {tuple(q.shape)}, keys {tuple(values.shape)} "
                         f"{values.dtype}, out {tuple(out.shape)} (needs AMX-BF16, H <= 64, Di = {GROUP}; FP8 keys "
                         f"with scales [n, 1] or bf16 ones)")
    half = scales is None
    _build(("cache_rows.cpp", "amx_index.cpp", "amx_index_rows.cpp"), ["AMX"], INDEX_ROWS_ARGS)(
        q.float().contiguous(), w.float().contiguous(), values.view(torch.uint8), NONE if half else scales, out,
        t, H, n, out.stride(0), int(half))


def sparse_prefill(q: torch.Tensor, ids: torch.Tensor, pages: Pages, scale: float, C: int,
                   isa: int | str | None = None) -> torch.Tensor:
    """Absorbed queries q [t, H, C+R] fp32 of one row, each over its selected key positions ids
    [t, K] (-1: empty) read in place from `pages` -> o_lat [t, H, C]: per head the softmax(scale
    q . row) weighted sum of row[:C] (MLA.attend_latent without the gather; over a bf16 or FP8 pool
    on AMX tiles where amx_attention.cpp takes the shapes). `isa`: as for `binding`."""
    (t, H, D), K = q.shape, ids.shape[1]
    table = pages.table
    ok = (q.dtype == torch.float32 and q.device.type == "cpu" and ids.dtype == torch.int64 and ids.shape[0] == t
          and C <= D and pools_ok(pages, D, pages.index.shape[1], C) and table.dtype == torch.int64
          and table.is_contiguous() and pages.block > 0
          and (ids.numel() == 0 or int(ids.max()) < table.numel() * pages.block))
    if not ok:
        raise ValueError(f"native sparse_prefill: unsupported q {tuple(q.shape)} {q.dtype}, ids {tuple(ids.shape)} "
                         f"{ids.dtype}, latent pool {tuple(pages.latent.shape)} {pages.latent.dtype}, C {C}")
    lat, _, layout = pool_args(pages)
    o = q.new_empty(t, H, C)
    _build(("cache_rows.cpp", "amx_index.cpp", *ATTENTION_FILES, "sparse_prefill.cpp"), _index_defines(isa, layout > 0),
           SPARSE_PREFILL_ARGS)(
        q.contiguous(), ids.contiguous(), *lat, table, o, t, H, D, C, K, pages.block, layout, float(scale))
    return o


def topk_rows(scores: torch.Tensor, limit: torch.Tensor, k: int, isa: int | None = None) -> torch.Tensor:
    """scores [t, S] fp32, limit [t] int64 -> for each row the k best of its first limit[i] scores
    (ties: the lower id; never -inf or NaN) as ids [t, k] ascending, -1 after them where fewer.
    `isa`: as for `binding`."""
    t, S = scores.shape
    if not (scores.dtype == torch.float32 and scores.device.type == "cpu" and limit.shape == (t,) and k > 0):
        raise ValueError(f"native topk_rows: unsupported scores {tuple(scores.shape)} {scores.dtype} "
                         f"{scores.device}, limit {tuple(limit.shape)}, k {k} (fp32 CPU scores [t, S], limit [t])")
    out = torch.empty(t, k, dtype=torch.int64)
    _build(("top_ids.cpp", "topk_rows.cpp"), [] if isa is None else [f"ISA {isa}"], TOPK_ROWS_ARGS)(
        scores.contiguous(), limit.to(torch.int64).contiguous(), out, t, S, k)
    return out


def head_sum(s: torch.Tensor, w: torch.Tensor, out: torch.Tensor, isa: int | None = None) -> None:
    """The indexer's head sum of one block: s [t*H, n] fp32 per-head dot products, w [t, H] ->
    out[i, j] = sum_h w[i, h] relu(s[i*H + h, j]), written into out [t, n] (rows may be apart).
    `isa`: as for `binding`."""
    (t, H), n = w.shape, s.shape[1]
    if not (s.dtype == w.dtype == out.dtype == torch.float32 and s.shape[0] == t * H and out.shape == (t, n)
            and s.is_contiguous() and w.is_contiguous() and out.stride(1) == 1 and s.device.type == "cpu"):
        raise ValueError(f"native head_sum: unsupported s {tuple(s.shape)} {s.dtype}, w {tuple(w.shape)} {w.dtype}, "
                         f"out {tuple(out.shape)} {out.dtype} (fp32 CPU, s [t*H, n] and w [t, H] contiguous)")
    _build(("head_sum.cpp",), [] if isa is None else [f"ISA {isa}"], HEAD_SUM_ARGS)(s, w, out, t, H, n, out.stride(0))


def gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, isa: int | str | None = None
         ) -> torch.Tensor:
    """x [M, K] fp32, packed w [N, K] (+ int8 scales [N, K/G]) -> x W^T [M, N] fp32; by default on
    AMX tiles where `amx_ready` and the shapes fit, else with the best vector code."""
    if not supports(x, w, scale):
        raise ValueError(f"native gemv: unsupported x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} "
                         f"{w.dtype} (K and the int8 group must be multiples of {ALIGN})")
    if isa == AMX and not _takes_amx(x.shape[0], w, scale):
        raise ValueError(f"native gemv on AMX: needs AMX for {w.dtype} weights (here: {amx_ready(w.dtype)}), "
                         f">= {AMX_ROWS} weight rows, <= {AMX_MAX_M} activation rows, int8 groups of a multiple of 64 columns")
    return gemv_unchecked(x, w, scale, isa)


def gemv_unchecked(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, isa: int | str | None = None
                 ) -> torch.Tensor:
    """`gemv` for arguments `supports` already accepted (callers on the decode path, which check
    once: ~2 us a call)."""
    x, w = x.contiguous(), w.contiguous()
    (M, K), N = x.shape, w.shape[0]
    y = x.new_empty(M, N)
    if isa is None and _takes_amx(M, w, scale):
        isa = AMX
    f = binding(w.dtype, isa)
    scales = () if scale is None else (scale.contiguous(),)
    groups = () if scale is None else (K // scale.shape[1],)
    step = AMX_PASS_M if isa == AMX else M
    if M <= step:
        f(x, w, *scales, y, M, N, K, *groups)
        return y
    for m in range(0, M, step):                  # y [M, N]: rows m.. of x and y are contiguous
        f(x[m:m + step], w, *scales, y[m:m + step], min(step, M - m), N, K, *groups)
    return y
