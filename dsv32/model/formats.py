"""Weight formats for CPU inference (`load_model(weight_format=...)`): how each matrix is stored
and read. Activations and every non-matrix tensor stay fp32 in all of them.

  fp32  every matrix fp32 (exact; the reference the others are measured against)
  bf16  every matrix bf16 (2 bytes/param), read by the compiled upcast-and-reduce kernels
  fp16  every matrix fp16 (2 bytes/param), likewise
  int8  every matrix int8 with one fp32 scale per (row, 128 columns) (~1.03 bytes/param)
  fp8   the checkpoint's FP8 e4m3 linears (128x128 block scales) converted once at load to the
        int8 layout above (e4m3 has no fast CPU decode: in-kernel decoding is compute-bound);
        the matrices FP8 checkpoints keep in 16 bits (embeddings, LM heads, eh_proj) stay bf16.
        A plain checkpoint is block-quantised to e4m3 first, so the numerics are those of FP8.

"Every matrix": the linears, the LM head(s) and the token embeddings; not the MoE router
(`mlp.gate`) nor the fp32-pinned indexer `weights_proj`, which are tiny. Token embeddings that the
checkpoint stores bf16 (the published one does) are read in place in every format but fp32
(mapping.py: exact rows, resident only once a token is seen; llama.cpp maps its files so).
"""
from __future__ import annotations

import warnings
from typing import Literal, get_args

import torch

WeightFormat = Literal["fp32", "bf16", "fp16", "int8", "fp8"]
WEIGHT_FORMATS: tuple[str, ...] = get_args(WeightFormat)

# The products of a packed matrix with more activation rows than the GEMV takes (a prefill chunk,
# and decode rows sharing its step): fp32 (exact, the default), or bfloat16 (activations and
# dequantised tiles rounded to bf16, fp32 sums: llama.cpp's numerics for 16-bit weights, ~2.3x the
# fp32 GEMM's rate on CPUs with AVX512-BF16 or AMX, far slower on others; bench/README.md)
PREFILL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_format(fmt: str) -> str:
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight_format {fmt!r}: one of {', '.join(WEIGHT_FORMATS)}")
    return fmt


def packed_storage(fmt: str, quantised: bool) -> str | None:
    """The packed storage ("int8" / "bf16" / "fp16") of one matrix under `fmt`, or None (plain).
    `quantised`: the published checkpoint stores this matrix as FP8 blocks."""
    check_format(fmt)
    if fmt == "fp32":
        return None
    if fmt == "fp8":
        return "int8" if quantised else "bf16"
    return fmt


def prepare_load(fmt: str, fp8_storage: bool, dtype: torch.dtype | None, device,
                 prefill_dtype: str = "float32") -> None:
    """Check a load's `weight_format` against its other options and, for a packed format, build
    its kernels now (a missing C++ toolchain fails the load with KernelError, not the first step)."""
    check_format(fmt)
    if prefill_dtype not in PREFILL_DTYPES:
        raise ValueError(f"unknown prefill_dtype {prefill_dtype!r}: one of {', '.join(PREFILL_DTYPES)}")
    if fmt == "fp32":
        if prefill_dtype != "float32":
            raise ValueError(f"prefill_dtype={prefill_dtype!r} needs a packed weight_format (bf16, fp16, "
                             f"int8, fp8): fp32 weights stay exact")
        return
    if fp8_storage:
        raise ValueError(f"weight_format={fmt!r} and fp8_storage=True exclude each other "
                         f"(fp8_storage keeps e4m3 weights and dequantises them per call)")
    if dtype not in (None, torch.float32) or torch.device(device).type != "cpu":
        raise ValueError(f"weight_format={fmt!r} packs weights for fp32 compute on CPU; "
                         f"got dtype {dtype}, device {device}")
    from .cpu import native
    from .cpu.build import cpu_flags, require_compiler
    from .layers import PACKED
    if prefill_dtype == "bfloat16" and not {"avx512_bf16", "amx_bf16"} & cpu_flags():
        warnings.warn("prefill_dtype='bfloat16' on a CPU without bf16 arithmetic (AVX512-BF16 or AMX): "
                      "its prefill will be slower than the exact float32 one", stacklevel=3)
    require_compiler()
    for storage in {packed_storage(fmt, q) for q in (True, False)}:
        native.binding(PACKED[storage])             # built, or read from build.py's disk cache
