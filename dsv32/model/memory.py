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
ALIGN = 64                  # bytes between tensors' starts in a shared mapping (torch's CPU alignment)


def empty_all(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """torch.empty(shape, dtype=dtype) on the CPU for each (shape, dtype). Those of MIN_BYTES or
    more are carved, each with a storage of its own, out of one private anonymous mapping, 2 MiB
    aligned and advised MADV_HUGEPAGE: a mapping each would cost two of the kernel's map areas a
    tensor, and the published checkpoint's ~45K expert matrices would pass its limit
    (vm.max_map_count, 65530 by default). The mapping is freed with the last of its tensors."""
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
    large = [i for i, n in enumerate(sizes) if n >= MIN_BYTES] if hasattr(mmap, "MADV_HUGEPAGE") else []
    out: list[torch.Tensor | None] = [None] * len(specs)
    if large:
        offsets, total = {}, 0
        for i in large:
            offsets[i], total = total, total + -(-sizes[i] // ALIGN) * ALIGN
        region = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        start = -torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
        try:
            region.madvise(mmap.MADV_HUGEPAGE, start, total)
        except OSError:                                        # a kernel built without THP: EINVAL
            pass
        whole = memoryview(region)                             # each slice keeps the mapping alive
        for i in large:
            shape, dtype = specs[i]
            piece = whole[start + offsets[i]:start + offsets[i] + sizes[i]]
            out[i] = torch.frombuffer(piece, dtype=torch.uint8).view(dtype).view(shape)
    return [t if t is not None else torch.empty(shape, dtype=dtype) for t, (shape, dtype) in zip(out, specs)]
