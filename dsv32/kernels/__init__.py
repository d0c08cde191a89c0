"""GPU fast paths beside the eager reference: FP8 block-scaled GEMMs, sync-free MoE dispatch, the
DSA indexer and sparse absorbed MLA over the paged cache, a fast decoder layer and CUDA graphs.

Nothing here is imported by `import dsv32` or by the engine, and nothing imports Triton at module
import: the Triton kernels live in `dsv32.kernels.triton.*` and are imported only when a caller
asks for the "triton" backend. Every fast function has a PyTorch reference it is tested against:

  fp8_gemm.py     fp8_linear (scaled_mm / Triton / torch)     ref: dequantise + F.linear
  grouped.py      expert packing + grouped SwiGLU experts     ref: MoE.routed (the per-expert loop)
  paged.py        indexer scores/top-k, sparse MLA (paged)    ref: Indexer.select, MLA.mqa_sparse
  layer.py        FastBlock / FastModel (one decoder step)    ref: Block / Transformer over PagedKV
  graphs.py       CUDA-graph capture/replay in batch buckets  ref: the same callable run eagerly
"""
from __future__ import annotations

import importlib.util

BACKENDS = ("torch", "triton")   # "torch": sync-free PyTorch formulation; "triton": the kernels


def triton_available() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def check_backend(backend: str) -> str:
    """Validate a backend name; "triton" also needs Triton installed."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' needs the triton package (it ships with torch's CUDA "
                           "wheels; on CPU: pip install triton, and TRITON_INTERPRET=1 to run)")
    return backend
