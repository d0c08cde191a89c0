"""A CPU engine's process reuses freed memory for large temporaries (heap.py)."""
import subprocess
import sys

import pytest

from dsv32.engine import executor
from dsv32.model.init_tiny import init_tiny

from .test_engine import make_engine

# page faults of four steps' large temporaries, with and without the call
SCRIPT = """
import resource, sys, torch
from dsv32.engine.heap import reuse_freed_memory
took = reuse_freed_memory() if sys.argv[1] == "1" else None
g = torch.ones(8 << 20)                          # 32 MB, as a prefill's MLP activation
def step():
    (torch.nn.functional.silu(g) * g).sum()      # two 32 MB temporaries, freed
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(call: bool) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, "1" if call else "0"], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_temporaries_reuse_freed_memory():
    took, reused = faults(True)
    _, fresh = faults(False)
    assert took == "True"
    assert fresh > 60000                          # 8 x 32 MB: 65536 pages, each faulted in afresh
    assert reused < fresh * 3 // 4                # glibc reuses what it kept (here about half: 32768)


# memory freed inside the heap (a block above it still held), as a load leaves it
TRIM = """
import ctypes
from dsv32.engine.heap import reuse_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
blocks = [libc.malloc(64 << 10) for _ in range(2048)]    # 128 MB in 64 KB blocks: the heap
for b in blocks:
    ctypes.memset(b, 1, 64 << 10)
held = libc.malloc(64 << 10)                             # keeps the heap's top in use
for b in blocks:
    libc.free(b)
before = rss()
reuse_freed_memory()
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_memory_freed_before_the_call_goes_back_to_the_system():
    returned = int(subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True, check=True).stdout)
    assert returned > 100 << 20


def test_a_cpu_engine_sets_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(executor, "reuse_freed_memory", lambda: calls.append(1) or True)
    make_engine(init_tiny(tmp_path / "m", vocab=512, layers=2), None)
    assert calls == [1]
