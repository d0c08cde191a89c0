"""A block's decode row in two native calls (layer_attn.cpp: the norms, projections, ropes and
absorbed query, then decode_attention.cpp's cache write, top-k and sparse attention; layer_ffn.cpp:
W_uv, o_proj, the residuals, the MLP or the MoE with its router), instead of compiled graphs and
Python between them: at the bench model's size every graph, native call and OpenMP region costs
more than its arithmetic (bench/README.md, "Decode step, part by part"). The weights' products run
on AMX tiles where amx_gemv.cpp takes them (int8, bf16), else gemv.cpp's row_dot.

`NativeLayer.fits(block)` says whether the kernels read every matrix of a block (one storage: int8
with per-(row, group) scales, bf16, fp16, or plain fp32), `NativeLayer(block, dtype)` gathers them.
model/decode.py decides when a step takes it; the reference is the eager `Block.reference`. Beside
it, a decode step's other small pieces in one call each: `rms_norm` (the final norm) and
`embedding_rows` (a packed table's rows).
"""
from __future__ import annotations

from operator import is_
from typing import Callable

import torch

from . import native
from .packed import group_size
from .pages import NONE, POOL_ARGS, Pages, pool_args

STORAGE = {torch.int8: "INT8", torch.bfloat16: "HALF_BF16", torch.float16: "HALF_FP16", torch.float32: "FP32"}
_C_TYPE = {torch.int8: "const int8_t*", torch.bfloat16: "const uint16_t*", torch.float16: "const uint16_t*",
           torch.float32: "const float*"}
ATTN_FILES = ("gemv.cpp", *native.INDEX_FILES, *native.ATTENTION_FILES, "decode_attention.cpp", "layer.cpp",
              "layer_attn.cpp")
FFN_FILES = ("gemv.cpp", "layer.cpp", "layer_ffn.cpp")
EMBED_ARGS = {t: ["const int64_t*", c, "const float*", "float*"] + ["const int64_t"] * 3
              for t, c in _C_TYPE.items()}
NORM_ARGS = ["const float*", "const float*", "float*", "const int64_t", "const int64_t", "const float"]


def _attn_args(w: str) -> list[str]:
    f = "const float*"
    return ([f] * 4 + [w, f, f, w, f, w, f, f, w, f, w, f, f, f, w, f, f] + POOL_ARGS * 2
            + ["const int64_t*", "float*", "float*", "int64_t*", "float*"] + ["const int64_t"] * 13 + ["const float"] * 3)


def _ffn_args(w: str) -> list[str]:
    f = "const float*"
    return (["float*", f, w, f, w, f, f, w, f, w, f, w, f, f, f, "const int64_t*", "float*", "int64_t*"]
            + ["const int64_t"] * 12 + ["const float"] * 2)


def _build(files: tuple[str, ...], dtype: torch.dtype, args: list[str]) -> Callable:
    """The layer kernel of `files` for weights stored as `dtype`: with AMX where the attention's
    tiles are ready here (amx_index.cpp, amx_attention.cpp: they take bf16 and FP8 pools only) and
    the weights' GEMV may use them too (amx_gemv.cpp: int8, bf16)."""
    amx = native._amx_index_ready() and (dtype not in native.AMX_FLAGS or native.amx_ready(dtype))
    if amx:
        files = ("gemv.cpp", "amx_gemv.cpp", *files[1:])
    return native._build(files, [STORAGE[dtype], "LAYER"] + (["AMX"] if amx else []), args)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., n] fp32 with weight w [n] fp32 in one native call (rms_norm.cpp; eager:
    ~7 ops, a compiled graph ~15-60 us of wrappers for one row)."""
    if not (x.dtype == w.dtype == torch.float32 and x.device.type == "cpu" and w.dim() == 1
            and x.shape[-1] == w.shape[0] and w.is_contiguous()):
        raise ValueError(f"native rms_norm: unsupported x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    native._build(("gemv.cpp", "layer.cpp", "rms_norm.cpp"), ["FP32", "LAYER"], NORM_ARGS)(
        x.contiguous(), w, out, x.numel() // w.shape[0], w.shape[0], float(eps))
    return out


def embedding_fits(w: torch.Tensor, scale: torch.Tensor | None) -> bool:
    """Whether `embedding_rows` reads this packed table (int8 with scales [V, D/group_size(D)],
    bf16, fp16; D a multiple of native.ALIGN)."""
    D = w.shape[1]
    return (w.dtype in STORAGE and w.dtype != torch.float32 and w.device.type == "cpu" and w.is_contiguous()
            and D % native.ALIGN == 0 and (scale is None) == (w.dtype != torch.int8)
            and (scale is None or (scale.shape == (w.shape[0], D // group_size(D)) and scale.is_contiguous())))


def embedding_rows(ids: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Rows `ids` [...] of a packed table w [V, D] (`embedding_fits`) as fp32 [..., D] in one
    native call (embedding.cpp; ~7 torch ops otherwise). IndexError for an id outside [0, V)."""
    if not (embedding_fits(w, scale) and ids.dtype == torch.int64):
        raise ValueError(f"native embedding_rows: unsupported table {tuple(w.shape)} {w.dtype}, ids {ids.dtype}")
    out = torch.empty(*ids.shape, w.shape[1])
    f = native._build(("gemv.cpp", "layer.cpp", "embedding.cpp"), [STORAGE[w.dtype], "LAYER"], EMBED_ARGS[w.dtype])
    try:
        f(ids.contiguous(), w, NONE if scale is None else scale, out, ids.numel(), *w.shape)
    except RuntimeError as e:
        raise IndexError(f"embedding: {e}") from None
    return out


def _linear(m) -> list[tuple]:
    """A Linear's weight and scales (None unless int8: NONE for the kernels) as (module, name)."""
    return [(m, "weight"), (m, "weight_scale_inv")]


def _linear_fits(m, dtype: torch.dtype) -> bool:
    """Whether Linear `m` is stored as `dtype` the way layer.cpp reads it."""
    w, s = m.weight, m.weight_scale_inv
    if w.dtype != dtype or m.bias is not None or m.fp8_block or m.fp8_act or not w.is_contiguous():
        return False
    if dtype == torch.float32:
        return m.packed is None and w.shape[1] % native.ALIGN == 0
    return (m.packed is not None and w.shape[1] % native.ALIGN == 0 and (s is None) == (dtype != torch.int8)
            and (s is None or (s.shape == (w.shape[0], w.shape[1] // group_size(w.shape[1])) and s.is_contiguous())))


class NativeLayer:
    """One block's weights in the order of the kernels' arguments (held: `current` says whether
    they are still the block's), the routed experts' pointers as a table, and the sizes."""

    def __init__(self, block, dtype: torch.dtype):
        a, mlp = block.self_attn, block.mlp
        ix = a.indexer
        self.dtype, moe = dtype, hasattr(mlp, "gate")
        dense = mlp.shared_experts if moe else mlp
        attn = [(block.input_layernorm, "weight"), *_linear(a.q_a_proj), (a.q_a_layernorm, "weight"),
                *_linear(a.q_b_proj), *_linear(a.kv_a_proj_with_mqa), (a.kv_a_layernorm, "weight"),
                *_linear(a.kv_b_proj), *_linear(ix.wk), (ix.k_norm, "weight"), (ix.k_norm, "bias"),
                *_linear(ix.wq_b), (ix.weights_proj, "weight")]
        ffn = [*_linear(a.kv_b_proj), *_linear(a.o_proj), (block.post_attention_layernorm, "weight"),
               *_linear(dense.gate_proj), *_linear(dense.up_proj), *_linear(dense.down_proj)]
        ffn += [(mlp.gate, "weight"), (mlp.gate, "e_score_correction_bias")] if moe else []
        experts = [r for e in mlp.experts for m in (e.gate_proj, e.up_proj, e.down_proj) for r in _linear(m)] \
            if moe else []
        self._where = [(m._parameters, name) for m, name in attn + ffn + experts]
        self._held = [d[name] for d, name in self._where]
        self.nbytes = sum(t.numel() * t.element_size() for t in self._held if t is not None)   # its weights
        args = [NONE if t is None else t for t in self._held]
        self.attn_args, self.ffn_args = args[:len(attn)], args[len(attn):len(attn) + len(ffn)] + ([] if moe else [NONE, NONE])
        self.table = torch.tensor([t.data_ptr() for t in args[len(attn) + len(ffn):]] or [0], dtype=torch.int64)
        self.sizes = (block.input_layernorm.weight.shape[0], a.q_a_proj.weight.shape[0], a.n_heads, a.nope, a.rope,
                      a.kv_rank, a.v_dim, ix.n_heads, ix.head_dim, dense.gate_proj.weight.shape[0])
        self.eps, self.k_eps = block.input_layernorm.eps, ix.k_norm.eps
        self._fns: dict = {}                # the built kernels: "attention", "ffn"
        g = mlp.gate if moe else None
        self.route = ((g.n_experts, mlp.experts[0].gate_proj.weight.shape[0], g.n_group, g.topk_group, g.topk,
                       int(g.norm), float(g.scaling)) if moe else (0, 0, 1, 1, 0, 0, 0.0))

    def current(self) -> bool:
        """Whether every weight held is still the block's (a `pack` or load replaces them)."""
        return all(map(is_, [d[name] for d, name in self._where], self._held))

    @staticmethod
    def fits(block) -> torch.dtype | None:
        """The storage of every matrix of `block` if the native row takes it, else None."""
        a, mlp = block.self_attn, block.mlp
        ix = a.indexer
        if ix.fp8_sim or ix.weights_proj.weight.dtype != torch.float32 or ix.weights_proj.packed:
            return None
        moe = hasattr(mlp, "gate")
        experts = list(mlp.experts) if moe else []
        dense = mlp.shared_experts if moe else mlp
        linears = [a.q_a_proj, a.q_b_proj, a.kv_a_proj_with_mqa, a.kv_b_proj, a.o_proj, ix.wk, ix.wq_b,
                   dense.gate_proj, dense.up_proj, dense.down_proj]
        if moe:
            g = mlp.gate
            if (any(e is None for e in experts) or mlp.packed is not None or g.weight.dtype != torch.float32
                    or g.n_experts % g.n_group or g.n_experts // g.n_group < 2 or g.topk > g.n_experts):
                return None
            linears += [m for e in experts for m in (e.gate_proj, e.up_proj, e.down_proj)]
        dtype = a.q_a_proj.weight.dtype
        others = [block.input_layernorm.weight, block.post_attention_layernorm.weight, a.q_a_layernorm.weight,
                  a.kv_a_layernorm.weight, ix.k_norm.weight, ix.k_norm.bias, ix.weights_proj.weight]
        others += [mlp.gate.weight, mlp.gate.e_score_correction_bias] if moe else []
        norms = (block.input_layernorm, block.post_attention_layernorm, a.q_a_layernorm, a.kv_a_layernorm)
        if (dtype not in STORAGE or not all(_linear_fits(m, dtype) for m in linears)
                or not all(t.dtype == torch.float32 and t.is_contiguous() for t in others)
                or len({n.eps for n in norms}) > 1):                    # the kernels take one RMSNorm eps
            return None
        return dtype

    def attention(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pages: Pages, S: int, topk: int,
                  scale: float) -> torch.Tensor:
        """h [D] -> o_lat [H, C] of the block's attention for the new token at key position S - 1,
        whose latent and indexer key it writes into `pages`."""
        D, Q, H, nope, R, C, v, Hi, Di, _ = self.sizes
        lat, ik, layout = pool_args(pages)
        f = self._fns.get("attention")
        if f is None:
            f = self._fns["attention"] = _build(ATTN_FILES, self.dtype, _attn_args(_C_TYPE[self.dtype]))
        work = h.new_empty(D + 2 * Q + 2 * (C + R) + Di + Hi + H * (nope + R) + Hi * Di + H * (C + R))
        o, scores, ids = h.new_empty(H, C), h.new_empty(S), torch.empty(min(S, topk), dtype=torch.int64)
        f(h, cos, sin, *self.attn_args, *lat, *ik, pages.table, work, scores, ids, o,
          D, Q, H, nope, R, C, v, Hi, Di, S, topk, pages.block, layout, self.eps, self.k_eps, scale)
        return o

    def ffn(self, h: torch.Tensor, o_lat: torch.Tensor) -> torch.Tensor:
        """h [D] and the attention's o_lat [H, C] -> the block's output [D]."""
        D, _, H, nope, _, C, v, _, _, I = self.sizes
        E, Ie, n_group, topk_group, k, norm, scaling = self.route
        f = self._fns.get("ffn")
        if f is None:
            f = self._fns["ffn"] = _build(FFN_FILES, self.dtype, _ffn_args(_C_TYPE[self.dtype]))
        out = h.clone()
        work = h.new_empty(H * v + 3 * D + 3 * I + E + k * (3 * Ie + D))
        ids = torch.empty(max(k, 1), dtype=torch.int64)
        f(out, o_lat, *self.ffn_args, self.table, work, ids, D, H, nope, v, C, I, E, Ie, n_group, topk_group, k, norm,
          scaling, self.eps)
        return out
