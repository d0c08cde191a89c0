"""prefill_dtype bfloat16: a packed matrix's products over many rows on bf16 activations (fp32
sums); the GEMV's rows (decode) stay exact."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from dsv32.model.checkpoint import load_model
from dsv32.model.cpu.packed import GEMV_MAX_ROWS, _gemm_bf16, dequantize, packed_linear, quantize_int8
from dsv32.model.init_tiny import init_tiny
from dsv32.model.layers import Linear

BF16 = torch.bfloat16


def packed(fmt, N=300, K=256, seed=0):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    return quantize_int8(w) if fmt == "int8" else (w.to({"bf16": BF16, "fp16": torch.float16}[fmt]), None)


@pytest.mark.parametrize("fmt", ["int8", "bf16", "fp16"])
def test_bf16_products_are_torch_bf16_gemm_of_the_rounded_operands(fmt):
    q, s = packed(fmt)
    x = torch.randn(GEMV_MAX_ROWS + 40, q.shape[1])
    want = F.linear(x.to(BF16), dequantize(q, s).to(BF16)).float()
    got = packed_linear(x, q, s, prefill_dtype=BF16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    exact = packed_linear(x, q, s)
    err = (got - exact).abs().max()
    assert 1e-3 < err < 0.01 * exact.abs().max()                     # not the fp32 products, near them


def test_long_rows_sum_their_tiles_in_fp32():
    q, s = packed("int8", N=64, K=512)
    x = torch.randn(50, 512)
    got = _gemm_bf16(x, q, s, rows=64, elems=64 * 128)                # 4 column tiles of 128
    w = dequantize(q, s).to(BF16)
    want = sum(F.linear(x[:, c:c + 128].to(BF16), w[:, c:c + 128]).float() for c in range(0, 512, 128))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_decode_rows_stay_exact(fmt):
    q, s = packed(fmt)
    x = torch.randn(GEMV_MAX_ROWS, q.shape[1])
    assert torch.equal(packed_linear(x, q, s, prefill_dtype=BF16), packed_linear(x, q, s))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("prefill_bf16"), vocab=4096, layers=2, shards=1)


def test_load_model_sets_every_packed_linear(ckpt):
    exact = load_model(ckpt, weight_format="int8", progress=False)
    fast = load_model(ckpt, weight_format="int8", prefill_dtype="bfloat16", progress=False)
    linears = [m for m in fast.modules() if isinstance(m, Linear) and m.packed]
    assert linears and all(m.prefill_dtype == BF16 for m in linears)
    assert all(m.prefill_dtype == torch.float32 for m in exact.modules() if isinstance(m, Linear))
    ids = torch.randint(0, 4096, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = exact(ids)[0], fast(ids)[0]
    # a random model amplifies rounding: int8 alone is 0.049 off fp32 on average here, top-1 92%
    assert 0 < (a - b).abs().mean() < 0.1 * a.abs().mean()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.85


def test_fp32_weights_refuse_it(ckpt):
    with pytest.raises(ValueError, match="prefill_dtype='bfloat16' needs a packed weight_format"):
        load_model(ckpt, prefill_dtype="bfloat16", progress=False)
    with pytest.raises(ValueError, match="unknown prefill_dtype 'fp16'"):
        load_model(ckpt, weight_format="int8", prefill_dtype="fp16", progress=False)


def test_a_cpu_without_bf16_arithmetic_is_warned(ckpt, monkeypatch):
    from dsv32.model.cpu import build
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    with pytest.warns(UserWarning, match="without bf16 arithmetic"):
        load_model(ckpt, weight_format="int8", prefill_dtype="bfloat16", progress=False)
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_model(ckpt, weight_format="int8", prefill_dtype="bfloat16", progress=False)
    assert not [w for w in seen if "bf16 arithmetic" in str(w.message)]
