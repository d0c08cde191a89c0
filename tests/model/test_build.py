"""The native kernels' own build (model/cpu/build.py): arguments, errors, the disk cache, the GIL,
and a single-stream run that never imports inductor or dynamo."""
import json
import subprocess
import sys
import threading
import time

import pytest
import torch

from dsv32.model.cpu import build
from dsv32.model.cpu.build import KernelError

AXPY = """
#include <stdexcept>
extern "C" void kernel(const float* x, float* y, const int64_t* n, const int64_t m, const float a) {
    if (m < 0) throw std::invalid_argument("m must be >= 0");
    for (int64_t i = 0; i < m; ++i) y[i] += a * x[i] + (float)n[i];
}
"""
AXPY_ARGS = ["const float*", "float*", "const int64_t*", "const int64_t", "const float"]


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "CACHE", tmp_path)
    return tmp_path


def test_a_kernel_reads_tensors_ints_and_floats(cache):
    f = build.load(AXPY, AXPY_ARGS, "axpy")
    x, y, n = torch.arange(5.0), torch.ones(5), torch.arange(10, 15)
    f(x, y, n, 4, 0.5)
    assert y.tolist() == [11.0, 12.5, 14.0, 15.5, 1.0]          # the fifth left alone (m = 4)
    f(x.data_ptr(), y, n, 1, 2.0)                               # a pointer as an int
    assert y[0].item() == 21.0


def test_errors_are_clear(cache):
    f = build.load(AXPY, AXPY_ARGS, "axpy")
    with pytest.raises(RuntimeError, match="m must be >= 0"):
        f(torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.int64), -1, 1.0)
    with pytest.raises(TypeError, match="takes 5 arguments, got 4"):
        f(torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.int64), 1)
    with pytest.raises(TypeError):
        f(torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.int64), "one", 1.0)
    with pytest.raises(TypeError, match="must be a tensor or an int, not NoneType"):
        f(torch.zeros(1), None, torch.zeros(1, dtype=torch.int64), 1, 1.0)
    with pytest.raises(ValueError, match="argument type 'double'"):
        build.load(AXPY, ["double"], "axpy")
    with pytest.raises(KernelError, match="could not build the native kernel broken.cpp.*error"):
        build.load('extern "C" void kernel(float* x) { undeclared(x); }', ["float*"], "broken.cpp")


def test_a_built_kernel_is_read_from_the_disk_cache(cache, monkeypatch):
    build.load(AXPY, AXPY_ARGS, "axpy")
    assert len(list(cache.glob("*.so"))) == 1

    def no_compiler(*a):
        raise AssertionError("compiled again")
    monkeypatch.setattr(build, "_compile", no_compiler)
    y = torch.zeros(2)
    build.load(AXPY, AXPY_ARGS, "axpy")(torch.ones(2), y, torch.zeros(2, dtype=torch.int64), 2, 3.0)
    assert y.tolist() == [3.0, 3.0]
    with pytest.raises(AssertionError, match="compiled again"):     # another source: another binary
        build.load(AXPY + "// changed\n", AXPY_ARGS, "axpy")
    real = build.wrapper
    monkeypatch.setattr(build, "wrapper", lambda name, args: real(name, args) + "// another entry point\n")
    with pytest.raises(AssertionError, match="compiled again"):     # another entry point: another binary
        build.load(AXPY, AXPY_ARGS, "axpy")


def test_an_unusable_cache_directory_falls_back_to_tmp(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setattr(build, "CACHE", blocker / "kernels")        # mkdir fails under a file
    y = torch.zeros(1)
    build.load(AXPY + "// fallback test\n", AXPY_ARGS, "axpy")(torch.ones(1), y, torch.zeros(1, dtype=torch.int64), 1, 2.0)
    assert y.tolist() == [2.0] and build._cache_dir().name.startswith("dsv32-kernels-")


def test_a_kernel_runs_without_the_gil(cache):
    spin = build.load("""
#include <chrono>
extern "C" void kernel(const int64_t ms) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    while (std::chrono::steady_clock::now() < end) {}
}""", ["const int64_t"], "spin")
    ticks = []
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)
    t = threading.Thread(target=count)
    t.start()
    time.sleep(0.02)
    t0 = time.perf_counter()
    spin(300)
    t1 = time.perf_counter()
    stop.set()
    t.join()
    assert sum(t0 < x < t1 for x in ticks) > 20                 # the thread ran while the kernel spun


def test_a_single_stream_run_never_imports_inductor(tiny_bf16):
    """Loading a packed model and serving one request (prefill past the indexer's top-k, decode on
    the native row) builds its kernels without inductor's toolchain and without dynamo."""
    code = f"""
import json, sys
from dsv32.engine.engine import EngineConfig, LLMEngine
from dsv32.engine.sequence import SamplingParams
for fmt in ("int8", "fp32"):
    eng = LLMEngine(EngineConfig(model={str(tiny_bf16)!r}, max_model_len=512, max_num_seqs=1, weight_format=fmt,
                                 enable_prefix_caching=False))
    eng.add_request("r", list(range(1000, 1300)), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
print(json.dumps([m for m in ("torch._inductor.codecache", "torch._inductor.cpp_builder", "torch._dynamo", "sympy")
                  if m in sys.modules]))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []
