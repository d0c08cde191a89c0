"""The C heap of a process that runs the model on CPU: freed memory is kept for the next large
temporary instead of each one being mapped afresh.

glibc serves an allocation over its mmap threshold (at most 32 MiB by default) from a fresh
mapping and unmaps it when freed, so every large temporary of a prefill (a [512, 16384] fp32
activation is 32 MiB) page-faults in again: on a 2-core VM, silu(gate) * up on two such tensors
took 22.7-25.0 ms this way and 5.4-6.0 ms from reused memory, and the wide benchmark model's
512-token prefill ran 1.1-1.35x faster (bench/README.md, "dsv32 vs llama.cpp"); decode and the
bench model's prefill did not move. The process keeps its high-water mark of temporaries instead
of returning it to the system (the wide model's peak RSS +1-3%). What loading freed (conversion
windows, the tokenizer's parse) is returned first: called after the load, the int8 bench model's
process settled at 376-377 MiB where it had kept 382-414.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameters (malloc.h)
LIMIT = 1 << 30                                 # bytes: allocations up to this come from the heap


def reuse_freed_memory() -> bool:
    """Return the memory freed so far to the system (malloc_trim), then set glibc's mmap and trim
    thresholds to LIMIT for this process. Returns whether the C library took both thresholds
    (False where it is not glibc: allocations then behave as before)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    malloc_trim(0)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, LIMIT)) and bool(mallopt(M_TRIM_THRESHOLD, LIMIT))
