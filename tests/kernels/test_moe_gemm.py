"""The Triton grouped expert GEMM against the per-expert loop (MoE.routed) and the gathered form."""
import pytest
import torch

from dsv32.kernels.grouped import PackedExperts
from tests.model.test_moe_dispatch import moe

from .conftest import CUDA, DEVICE, needs_triton, rel_err


@needs_triton
@pytest.mark.parametrize("fp8,N", [(False, 3), (True, 24)])
def test_triton_experts_equal_loop(fp8, N):
    m = moe(seed=N, fp8=fp8).to(DEVICE)
    x = torch.randn(N, 256, device=DEVICE)
    with torch.no_grad():
        ref = m(x)
        m.pack_experts(PackedExperts.from_moe(m, "triton"))
        got = m(x)
        gathered = m.packed.gathered(x, *m.packed.assignments(*m.gate(x)[:2]))
    assert rel_err(got, ref) < 1e-5
    assert rel_err(got, gathered + 0 * got) < 1e-5


@needs_triton
def test_triton_experts_bf16(gen):
    m = moe(seed=1, fp8=True).to(DEVICE)
    for mod in m.modules():                      # bf16 compute, FP8 weights, fp32 gate as loaded
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.dtype == torch.float32 and name == "weight" and mod is not m.gate:
                setattr(mod, name, torch.nn.Parameter(p.data.bfloat16(), requires_grad=False))
    x = torch.randn(6, 256, device=DEVICE, generator=gen).bfloat16()
    with torch.no_grad():
        ref = m(x).double()
        m.pack_experts(PackedExperts.from_moe(m, "triton"))
        got = m(x)
    assert got.dtype == torch.bfloat16 and rel_err(got, ref) < 2e-2


@pytest.mark.skipif(not CUDA, reason="host synchronisations are detected on a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_moe_never_syncs(backend):
    m = moe(fp8=True).to(DEVICE)
    m.pack_experts(PackedExperts.from_moe(m, backend))
    x = torch.randn(4, 256, device=DEVICE)
    with torch.no_grad():
        m(x)                                      # compile / warm up outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            m(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
