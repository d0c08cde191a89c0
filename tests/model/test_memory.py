"""Large CPU weights in memory advised for huge pages (model/memory.py), as load_model gives them."""
import gc
import mmap
import sys

import pytest
import torch

from dsv32.model import memory
from dsv32.model.checkpoint import load_model
from dsv32.model.init_tiny import init_tiny
from safetensors.torch import save_file

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


def maps() -> int:
    return len(open("/proc/self/maps").readlines())


@linux_thp
def test_large_tensors_share_one_advised_mapping_each_with_a_storage_of_its_own():
    before = maps()
    specs = [((1 << 20) + 3 * i, torch.float16) for i in range(300)] + [((10, 7), torch.float32)]
    ts = memory.empty_all([((n,), d) if isinstance(n, int) else (n, d) for n, d in specs])
    assert maps() - before <= 16        # one mapping (and Python's own arenas), not two a tensor: 600
    big, small = ts[:300], ts[300]
    assert small.shape == (10, 7) and small.dtype == torch.float32
    assert big[0].data_ptr() % memory.HUGE_PAGE == 0
    for i, t in enumerate(big):
        assert t.shape == ((1 << 20) + 3 * i,) and t.dtype == torch.float16
        assert t.data_ptr() % memory.ALIGN == 0
        assert t.untyped_storage().nbytes() == t.numel() * 2           # its own storage, no more
        t.fill_(i)
    assert all(t[-1].item() == i and t[0].item() == i for i, t in enumerate(big))   # no overlaps
    assert "hg" in vm_flags(big[0].data_ptr()) and "hg" in vm_flags(big[-1].data_ptr())   # MADV_HUGEPAGE
    address = big[0].data_ptr()
    del ts, big, t
    gc.collect()
    flags = vm_flags(address)                       # unmapped with its last tensor (or reused since)
    assert flags is None or "hg" not in flags


def test_every_size_and_shape_holds_its_values():
    small, wide = memory.empty_all([((100, 7), torch.bfloat16), ((1024, 2048), torch.float16)])
    assert small.shape == (100, 7) and small.dtype == torch.bfloat16
    wide.copy_(torch.arange(1024 * 2048).view(1024, 2048).half())
    assert wide.is_contiguous() and wide[1023, 2047].item() == float(torch.tensor(1024 * 2048 - 1).half())
    assert memory.empty_all([]) == []


@linux_thp
def test_load_model_puts_large_cpu_weights_in_advised_memory(tmp_path):
    init_tiny(tmp_path, seed=0, layers=1, hidden=256, heads=2, q_lora=64, kv_lora=64, nope=32, rope=32, v=32,
              inter=128, moe_inter=64, experts=4, groups=2, topk_group=1, active=2, index_heads=16,
              index_dim=64, topk=16, dense=1)
    for fmt in ("fp32", "int8"):                                          # plain, packed
        model = load_model(tmp_path, weight_format=fmt, progress=False)
        head = model.lm_head.weight                                       # 129280 rows
        assert head.numel() * head.element_size() >= 16 << 20
        assert "hg" in vm_flags(head.data_ptr()), fmt
    once = {k: v.detach() for k, v in model.named_parameters()}           # the MTP layer's ties once
    save_file(once, tmp_path / "out.safetensors")                         # no storage shared: it saves
