"""Kernel tests run compiled on CUDA when a GPU is present, else under Triton's interpreter on CPU
(TRITON_INTERPRET=1, set here before any test imports triton); without triton they skip."""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv32.kernels import triton_available  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")


def _interpreter_too_old() -> bool:
    """Triton's interpreter before 3.9 fails on loop bounds computed in the kernel (seen with 3.6
    and numpy 2: "only 0-dimensional arrays can be converted"); compiled CUDA runs are fine."""
    from importlib.metadata import version
    major, minor = (int(x) for x in version("triton").split(".")[:2])
    return not CUDA and (major, minor) < (3, 9)


needs_triton = pytest.mark.skipif(
    not triton_available() or _interpreter_too_old(),
    reason="triton is not installed (it ships with torch's CUDA wheels; on a CPU machine "
           "`pip install dsv32[kernels]` adds it and these tests run under TRITON_INTERPRET=1), "
           "or its interpreter is older than 3.9 (it cannot run these kernels' loop bounds)")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (NaN never passes)."""
    x, ref = x.double(), ref.double()
    e = ((x - ref).norm() / ref.norm()).item()
    return float("inf") if e != e else e


@pytest.fixture
def gen():
    """A generator on the test device, freshly seeded per test."""
    return torch.Generator(device=DEVICE).manual_seed(torch.randint(0, 2**31, ()).item())
