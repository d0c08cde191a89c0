"""Large CPU tensors in memory advised for transparent huge pages (2 MiB pages where the kernel
grants them: Linux with THP "always" or "madvise"). Decode streams the weights from memory every
step; in 4 KiB pages each 4 KiB costs a TLB miss, under a hypervisor a nested page walk, and the
streams read slower (bench/README.md, "Huge pages"). The advice is a hint: where the kernel has no
THP the memory is the same, in 4 KiB pages."""
from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20
# below this a tensor takes torch's allocator (no whole 2 MiB page to gain)
MIN_BYTES = HUGE_PAGE


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype) on the CPU; from MIN_BYTES up in its own private anonymous
    mapping, 2 MiB aligned and advised MADV_HUGEPAGE (unmapped when the tensor is freed)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)          # keeps the mapping alive
    start = -raw.data_ptr() % HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    except OSError:                                            # a kernel built without THP: EINVAL
        pass
    return raw[start:start + nbytes].view(dtype).view(shape)
