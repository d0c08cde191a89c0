"""FP8 block-scaled GEMM (Triton, scaled_mm) against dequantise + matmul."""
import pytest
import torch

from dsv32.kernels.fp8_gemm import act_quant, fp8_linear, fp8_linear_ref, scaled_mm_variant
from dsv32.model.fp8 import act_quant_dequant, block_quant
from dsv32.model.layers import Linear

from .conftest import CUDA, DEVICE, needs_triton, rel_err


def weight(N, K, gen):
    w, s = block_quant(torch.randn(N, K, device=DEVICE, generator=gen) * 0.05)
    return w, s


def test_reference_is_linear(gen):
    """The reference is exactly what an FP8-storage Linear computes."""
    lin = Linear(256, 192).to(DEVICE)
    torch.nn.init.normal_(lin.weight, std=0.05)
    lin.use_fp8_storage()
    x = torch.randn(3, 4, 256, device=DEVICE, generator=gen)
    assert torch.equal(fp8_linear_ref(x, lin.weight, lin.weight_scale_inv), lin(x))
    lin.fp8_act = True
    assert torch.equal(fp8_linear_ref(x, lin.weight, lin.weight_scale_inv, "w8a8"), lin(x))


def test_act_quant_matches_simulation(gen):
    x = torch.randn(5, 384, device=DEVICE, generator=gen) * 3
    q, s = act_quant(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 3)
    back = (q.float().unflatten(-1, (3, 128)) * s.unsqueeze(-1)).flatten(-2)
    assert torch.equal(back, act_quant_dequant(x))


@needs_triton
@pytest.mark.parametrize("M,N,K", [(1, 96, 200), (5, 256, 384), (33, 130, 1024)])
def test_w8a16_fp32_matches_reference(M, N, K, gen):
    """fp32 activations: the kernel applies the block scale after the dot, the reference before;
    both are fp32 arithmetic (edge blocks included: N, K not multiples of 128)."""
    w, s = weight(N, K, gen)
    x = torch.randn(M, K, device=DEVICE, generator=gen)
    y = fp8_linear(x, w, s, "w8a16", backend="triton")
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert rel_err(y, fp8_linear_ref(x.double(), w, s)) < 1e-5


@needs_triton
def test_w8a16_bf16_and_batched_shape(gen):
    w, s = weight(256, 512, gen)
    x = torch.randn(2, 3, 512, device=DEVICE, generator=gen).bfloat16()
    y = fp8_linear(x, w, s, "w8a16", backend="triton")
    assert y.shape == (2, 3, 256) and y.dtype == torch.bfloat16
    assert rel_err(y, fp8_linear_ref(x.double(), w, s)) < 1e-2


@needs_triton
@pytest.mark.parametrize("M", [3, 40])
def test_w8a8_matches_quantised_reference(M, gen):
    """Activations quantised per 1x128: equal to the fp8_act reference up to fp32 summation
    (Triton) or within bf16 output rounding (scaled_mm on SM90)."""
    w, s = weight(256, 768, gen)
    x = torch.randn(M, 768, device=DEVICE, generator=gen).bfloat16()
    y = fp8_linear(x, w, s, "w8a8", backend="triton")
    ref = fp8_linear_ref(act_quant_dequant(x).double(), w, s)
    assert rel_err(y, ref) < 1e-2


@needs_triton
def test_split_k_used_and_exact(gen):
    """A long K with one output tile splits K (fp32 partials summed): still the same product."""
    from dsv32.kernels.triton.fp8_gemm import config
    assert config(1, 64, 4096, 132)[2] > 1
    w, s = weight(64, 2048, gen)
    x = torch.randn(1, 2048, device=DEVICE, generator=gen)
    assert rel_err(fp8_linear(x, w, s, backend="triton"), fp8_linear_ref(x.double(), w, s)) < 1e-5


@pytest.mark.skipif(not CUDA, reason="scaled_mm blockwise support is probed on a CUDA device")
def test_scaled_mm_probe_reports():
    v = scaled_mm_variant(DEVICE)
    print(f"scaled_mm blockwise on {torch.cuda.get_device_name()}: {v}")
    assert v in (None, "plain", "pad_k4")


def test_rejects_bad_mode_and_backend(gen):
    w, s = weight(128, 128, gen)
    x = torch.randn(1, 128, device=DEVICE)
    with pytest.raises(ValueError):
        fp8_linear(x, w, s, mode="int8")
    with pytest.raises(ValueError):
        fp8_linear(x, w, s, backend="cuda")
