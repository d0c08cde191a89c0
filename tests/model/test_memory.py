"""Large CPU weights in memory advised for huge pages (model/memory.py), as load_model gives them."""
import gc
import mmap
import sys

import pytest
import torch

from dsv32.model import memory
from dsv32.model.checkpoint import load_model
from dsv32.model.init_tiny import init_tiny

linux_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"),
                               reason="transparent huge pages are a Linux feature")


def vm_flags(address: int) -> list[str] | None:
    """The VmFlags of the mapping holding `address` (None: no mapping holds it)."""
    found = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(a, 16) for a in head.split("-"))
            found = lo <= address < hi
        elif found and head == "VmFlags:":
            return line.split()[1:]
    return None


@linux_thp
def test_a_large_tensor_gets_its_own_huge_page_advised_mapping_and_gives_it_back():
    t = memory.empty(((3 << 20) // 4 + 5,), torch.float32)               # 3 MiB and a bit
    assert t.shape == ((3 << 20) // 4 + 5,) and t.dtype == torch.float32
    assert t.data_ptr() % memory.HUGE_PAGE == 0
    t.fill_(1.5)
    assert t.sum().item() == 1.5 * t.numel()
    address = t.data_ptr()
    assert "hg" in vm_flags(address)                                     # MADV_HUGEPAGE
    del t
    gc.collect()
    assert vm_flags(address) is None                                     # unmapped with the tensor


def test_every_size_and_shape_holds_its_values():
    small = memory.empty((100, 7), torch.bfloat16)
    assert small.shape == (100, 7) and small.dtype == torch.bfloat16
    big = memory.empty((1024, 1024), torch.int8)                          # 1 MiB < MIN_BYTES
    assert big.is_contiguous() and big.shape == (1024, 1024)
    wide = memory.empty((1024, 2048), torch.float16)                      # 4 MiB, 2-D
    wide.copy_(torch.arange(1024 * 2048).view(1024, 2048).half())
    assert wide.is_contiguous() and wide[1023, 2047].item() == float(torch.tensor(1024 * 2048 - 1).half())


@linux_thp
def test_load_model_puts_large_cpu_weights_in_advised_memory(tmp_path):
    init_tiny(tmp_path, seed=0, layers=1, hidden=256, heads=2, q_lora=64, kv_lora=64, nope=32, rope=32, v=32,
              inter=128, moe_inter=64, experts=4, groups=2, topk_group=1, active=2, index_heads=16,
              index_dim=64, topk=16, dense=1)
    for fmt in ("fp32", "int8"):                                          # plain, packed
        head = load_model(tmp_path, weight_format=fmt, progress=False).lm_head.weight   # 129280 rows
        assert head.numel() * head.element_size() >= 16 << 20
        assert head.data_ptr() % memory.HUGE_PAGE == 0 and "hg" in vm_flags(head.data_ptr()), fmt
