"""The GPU paths stay optional. A CPU-only install (triton hidden: `sys.modules["triton"] = None`)
imports dsv32 and its kernels package, runs the engine and the fast paths' torch backend; and where
triton is installed, no dsv32 module outside dsv32.kernels.triton imports it (torch itself may:
its meta-device initialisation probes for triton through torch._dynamo)."""
import subprocess
import sys

import pytest

from dsv32.kernels import triton_available

SCRIPT = """
import builtins, sys
mode, path = sys.argv[1], sys.argv[2]
importers = []
if mode == "hidden":
    sys.modules["triton"] = None                    # what an install without triton looks like
else:
    real = builtins.__import__
    def spy(name, globals=None, *a, **k):
        if name == "triton" or name.startswith("triton."):
            importers.append((globals or {}).get("__name__", "?"))
        return real(name, globals, *a, **k)
    builtins.__import__ = spy
import torch
import dsv32, dsv32.kernels, dsv32.kernels.fp8_gemm, dsv32.kernels.grouped, dsv32.kernels.paged
import dsv32.kernels.layer, dsv32.kernels.graphs
from dsv32.engine.llm import LLM
from dsv32.engine.sequence import SamplingParams
out = LLM(path).generate([{"prompt_token_ids": [5, 6, 7]}],
                         SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
assert len(out[0].outputs[0].token_ids) == 3
from tests.kernels.test_layer import run_both
assert run_both("torch", True, steps=1) < 1e-5
if mode == "hidden":
    from dsv32.kernels import check_backend, triton_available
    assert not triton_available()
    try:
        check_backend("triton")
        raise AssertionError("backend 'triton' accepted without triton")
    except RuntimeError as e:
        assert "pip install triton" in str(e)
bad = sorted({m for m in importers if m.startswith("dsv32") and not m.startswith("dsv32.kernels.triton")})
print("DSV32 IMPORTERS", bad)
assert not bad, bad
"""


def run(mode, ckpt):
    r = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(ckpt)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DSV32 IMPORTERS []" in r.stdout


def test_runs_without_triton(tiny_fp8_ue8m0):
    run("hidden", tiny_fp8_ue8m0)


@pytest.mark.skipif(not triton_available(), reason="checks who imports triton where it is installed")
def test_dsv32_never_imports_triton_itself(tiny_fp8_ue8m0):
    run("spy", tiny_fp8_ue8m0)
