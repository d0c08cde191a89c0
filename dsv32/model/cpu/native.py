"""Native decode kernels (C++ beside this file, built on first use by inductor's C++ toolchain):

  gemv.cpp              the packed-weight GEMV: reads int8 / fp16 / bf16 weights at the memory's
                        bandwidth with fp32 activations, where inductor's generated reduction
                        reaches ~60% of it on large matrices (bench/README.md, "Weight-format
                        kernels"). Called directly (eager decode, the LM head); inside a traced
                        graph as the custom op `dsv32::packed_gemv` (~10 us of dispatch, so
                        model/cpu/packed.py uses it there for large matrices only). Reference:
                        packed.packed_linear_reference.
  (vec.h: the float vector operations both use, for AVX-512, AVX2 or plain C)
  sparse_attention.cpp  one decode row's absorbed attention over its selected latent rows, read in
                        place from the cache pool (one call instead of a gather and ~10 eager ops).
                        Reference: MLA.attend_latent.
  index_topk.cpp        one decode row's indexer scores over every earlier key, read in place, and
                        their top-k. Reference: Indexer.scores + Indexer.top.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from .compile import KernelError, require_compiler

DEFINES = {torch.int8: "INT8", torch.float16: "HALF_FP16", torch.bfloat16: "HALF_BF16"}
ALIGN = 32                  # K (and the int8 group size) must be multiples of this
_built: dict[tuple, Callable] = {}
# the C signatures of each kernel's entry point (pointers to tensors' data, then sizes)
GEMV_ARGS = {torch.int8: ["const float*", "const int8_t*", "const float*", "float*"] + ["const int64_t"] * 4,
             torch.float16: ["const float*", "const uint16_t*", "float*"] + ["const int64_t"] * 3}
GEMV_ARGS[torch.bfloat16] = GEMV_ARGS[torch.float16]
ATTENTION_ARGS = ["const float*", "const float*", "const int64_t*", "float*", "float*"] + ["const int64_t"] * 4 + ["const float"]
TOPK_ARGS = ["const float*", "const float*", "const float*", "const int64_t*", "float*", "int64_t*"] + ["const int64_t"] * 4


def supports(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> bool:
    """Whether `gemv` computes x [M, K] fp32 with the packed weight w [N, K] on this device."""
    K = w.shape[1]
    return (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype in DEFINES and K % ALIGN == 0
            and (scale is None) == (w.dtype != torch.int8)
            and (scale is None or (K // scale.shape[1]) % ALIGN == 0))


def _build(file: str, defines: list[str], args: list[str]) -> Callable:
    """The `kernel` of `file` (beside this module) with `defines`, as a Python callable."""
    key = (file, *defines)
    f = _built.get(key)
    if f is None:
        require_compiler()
        from torch._inductor.codecache import CppPythonBindingsCodeCache
        here = Path(__file__).parent
        source = "".join(f"#define {d}\n" for d in defines) + (here / "vec.h").read_text() + (here / file).read_text()
        try:
            f = _built[key] = CppPythonBindingsCodeCache.load_pybinding(args, source)
        except Exception as e:                              # noqa: BLE001  (re-raised, explained)
            raise KernelError(f"could not build the native kernel dsv32/model/cpu/{file} with "
                              f"inductor's C++ toolchain: {e}") from e
    return f


def binding(dtype: torch.dtype, isa: int | None = None) -> Callable:
    """The built GEMV for weights of `dtype`; `isa` 512 / 256 / 1 forces AVX-512, AVX2 or the
    scalar code (default: the best the compiler targets on this machine)."""
    return _build("gemv.cpp", [DEFINES[dtype]] + ([] if isa is None else [f"ISA {isa}"]), GEMV_ARGS[dtype])


def sparse_attention(q: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, scale: float, C: int
                     ) -> torch.Tensor:
    """One row's absorbed queries q [H, D] over the latent rows pool[slots] (pool [N, D] fp32,
    contiguous: read in place, never copied; slots [K], -1 = empty) -> o_lat [H, C]: the
    softmax(scale q . row) weighted sum of row[:C]."""
    if not (q.dtype == pool.dtype == torch.float32 and slots.dtype == torch.int64 and pool.dim() == 2
            and pool.is_contiguous() and q.shape[1] == pool.shape[1] and C <= pool.shape[1]):
        raise ValueError(f"native sparse_attention: unsupported q {tuple(q.shape)} {q.dtype}, pool "
                         f"{tuple(pool.shape)} {pool.dtype}, slots {slots.dtype}")
    (H, D), K = q.shape, slots.numel()
    f = _build("sparse_attention.cpp", [], ATTENTION_ARGS)
    o, scratch = q.new_empty(H, C), q.new_empty(H, K)
    f(q.contiguous(), pool, slots.contiguous(), o, scratch, H, K, D, C, float(scale))
    return o


def gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, isa: int | None = None
         ) -> torch.Tensor:
    """x [M, K] fp32, packed w [N, K] (+ int8 scales [N, K/G]) -> x W^T [M, N] fp32."""
    if not supports(x, w, scale):
        raise ValueError(f"native gemv: unsupported x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} "
                         f"{w.dtype} (K and the int8 group must be multiples of {ALIGN})")
    x, w = x.contiguous(), w.contiguous()
    (M, K), N = x.shape, w.shape[0]
    y = x.new_empty(M, N)
    if scale is None:
        binding(w.dtype, isa)(x, w, y, M, N, K)
    else:
        binding(w.dtype, isa)(x, w, scale.contiguous(), y, M, N, K, K // scale.shape[1])
    return y


@torch.library.custom_op("dsv32::packed_gemv", mutates_args=())
def packed_gemv(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """`gemv` as an operator, so traced graphs can call it."""
    return gemv(x, w, scale)


@packed_gemv.register_fake
def _(x, w, scale):
    return x.new_empty(x.shape[0], w.shape[0])


def index_topk(q: torch.Tensor, w: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, k: int) -> torch.Tensor:
    """One row's index queries q [H, Di] and head weights w [H] over the keys pool[slots] (pool
    [N, Di] fp32, contiguous: read in place; slots [S], key s at slots[s]) -> the ids (0..S-1) of
    the k best `sum_h w[h] relu(q[h] . key)` scores [k], best first, ties to the lower id."""
    S = slots.numel()
    if not (q.dtype == w.dtype == pool.dtype == torch.float32 and slots.dtype == torch.int64
            and pool.dim() == 2 and pool.is_contiguous() and q.shape[1] == pool.shape[1] and 0 < k <= S):
        raise ValueError(f"native index_topk: unsupported q {tuple(q.shape)} {q.dtype}, pool "
                         f"{tuple(pool.shape)} {pool.dtype}, slots {slots.dtype}, k {k} of {S}")
    (H, D) = q.shape
    f = _build("index_topk.cpp", [], TOPK_ARGS)
    scores, out = q.new_empty(S), torch.empty(k, dtype=torch.int64)
    f(q.contiguous(), w.contiguous(), pool, slots.contiguous(), scores, out, H, D, S, k)
    return out
