"""model/cpu/native.py's GEMV: the native packed GEMV (each instruction-set variant, and AMX
where the CPU has it) against the slow reference (dequantise, then F.linear), and where
packed_linear, dense_linear and traced graphs use it."""
import pytest
import torch
from torch import nn

from dsv32.model.cpu import native, packed
from dsv32.model.cpu.compile import dynamic, kernel
from dsv32.model.cpu.packed import packed_linear, packed_linear_reference, quantize_int8
from dsv32.model.layers import Linear

G = torch.Generator().manual_seed(0)
CAPS = torch.backends.cpu.get_cpu_capability()
ISAS = [None, 1] + ([256] if CAPS in ("AVX2", "AVX512") else []) + ([512] if CAPS == "AVX512" else [])


def weights(fmt: str, N: int, K: int):
    w = torch.randn(N, K, generator=G) * 0.05
    if fmt == "int8":
        return quantize_int8(w)
    return w.to(dict(fp16=torch.float16, bf16=torch.bfloat16, fp32=torch.float32)[fmt]), None


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["int8", "fp16", "bf16", "fp32"])
@pytest.mark.parametrize("N,K", [(37, 256), (300, 160), (5, 32)])      # 160: one int8 group a row
def test_native_gemv_equals_reference(fmt, N, K, isa):
    w, s = weights(fmt, N, K)
    for M in (1, 3, 4):
        x = torch.randn(M, K, generator=G)
        torch.testing.assert_close(native.gemv(x, w, s, isa), packed_linear_reference(x, w, s),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["int8", "fp16", "bf16", "fp32"])
@pytest.mark.parametrize("N,K", [(9, 4224), (6, 4096)])
def test_long_rows_four_at_a_time_sum_as_one_at_a_time(fmt, N, K, isa):
    """K >= 4096: rows go four at a time (gemv.cpp's block_dots, the last N % 4 one at a time), each
    summed exactly as a row alone is (row_dot)."""
    w, s = weights(fmt, N, K)
    x = torch.randn(2, K, generator=G)
    y = native.gemv(x, w, s, isa)
    torch.testing.assert_close(y, packed_linear_reference(x, w, s), rtol=1e-5, atol=1e-5)
    for i in range(N):
        assert torch.equal(y[:, i:i + 1], native.gemv(x, w[i:i + 1], None if s is None else s[i:i + 1], isa))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["int8", "fp16", "bf16", "fp32"])
@pytest.mark.parametrize("N,K", [(38, 256), (10, 2048), (7, 4224)])
def test_a_batch_sums_each_row_as_it_sums_one_row_alone(fmt, N, K, isa):
    """M > 1 activation rows go in blocks with several weight rows (gemv.cpp's block_dots: 1 x 4
    where a weight row is shorter than 4 KiB, else 4 x 2; the last M % MR rows and N % NR weight
    rows alone): every output equals the one row's own call bit for bit, so a request's logits do
    not depend on the batch it was decoded in."""
    w, s = weights(fmt, N, K)
    x = torch.randn(9, K, generator=G)
    for M in (2, 5, 9):
        y = native.gemv(x[:M], w, s, isa)
        torch.testing.assert_close(y, packed_linear_reference(x[:M], w, s), rtol=1e-5, atol=1e-4)
        for m in range(M):
            assert torch.equal(y[m], native.gemv(x[m:m + 1], w, s, isa)[0]), (M, m)
        i = N - 1                                                  # and a weight row alone
        assert torch.equal(y[:, i:i + 1], native.gemv(x[:M], w[i:i + 1], None if s is None else s[i:i + 1], isa))


@pytest.mark.parametrize("isa", ISAS)
def test_fp16_special_values(isa):
    """Subnormals, the largest finite value, inf and signed zeros convert exactly (row i holds
    value i in column 3, zeros elsewhere; x picks column 3)."""
    vals = torch.tensor([0.0, -0.0, 6e-8, -3e-6, 65504.0, float("inf"), float("-inf"), -2.5], dtype=torch.float16)
    w = torch.zeros(8, 32, dtype=torch.float16)
    w[:, 3] = vals
    x = torch.zeros(1, 32)
    x[0, 3] = 1.0
    assert torch.equal(native.gemv(x, w, None, isa)[0], vals.float())


def test_dense_linear_takes_the_native_gemv_for_few_rows_only_without_autograd(monkeypatch):
    """fp32 Linear rows (a decode step's LM head): up to GEMV_MAX_ROWS rows on the native GEMV,
    equal to F.linear; more rows, autograd or a non-contiguous weight: F.linear itself."""
    calls = []
    real = native.gemv_unchecked                 # (after dense_linear's own supports check)
    monkeypatch.setattr(native, "gemv_unchecked", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    w, b = torch.randn(300, 256, generator=G), torch.randn(300, generator=G)
    for M, native_rows in ((1, True), (3, True), (packed.GEMV_MAX_ROWS, True), (packed.GEMV_MAX_ROWS + 1, False)):
        x = torch.randn(2, M, 256, generator=G)[:1]
        calls.clear()
        with torch.no_grad():
            y = packed.dense_linear(x, w, b)
        # sums of 256 products of N(0, 1) values in another order: ~|x| |w| 2^-24 sqrt(256) apart
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4)
        assert calls == ([M] if native_rows else []), M
    calls.clear()
    wg = w.clone().requires_grad_()
    y = packed.dense_linear(torch.randn(1, 256, generator=G), wg)
    y.sum().backward()                                       # autograd: F.linear
    assert wg.grad is not None and calls == []
    with torch.no_grad():
        packed.dense_linear(torch.randn(1, 256, generator=G), torch.randn(256, 300, generator=G).t())
    assert calls == []                                        # a transposed weight is not copied per call


def test_unsupported_shapes_use_the_compiled_kernel():
    w, s = weights("int8", 16, 40)                       # K not a multiple of 32
    x = torch.randn(1, 40, generator=G)
    assert not native.supports(x, w, s)
    with pytest.raises(ValueError, match="multiples of 32"):
        native.gemv(x, w, s)
    torch.testing.assert_close(packed_linear(x, w, s), packed_linear_reference(x, w, s), rtol=1e-5, atol=1e-5)


AMX_HERE = {"int8": native.amx_ready(torch.int8), "bf16": native.amx_ready(torch.bfloat16)}


def need_amx(fmt: str) -> None:
    if not AMX_HERE[fmt]:
        pytest.skip(f"no AMX for {fmt} weights on this CPU")


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
@pytest.mark.parametrize("N,K", [(37, 256), (64, 192), (16, 1024), (2048, 128)])   # int8 192: one 3-tile group a row
def test_amx_gemv_equals_reference(fmt, N, K):
    """The AMX kernels (activations as three limbs of the weights' type) are as close to the fp32
    reference as the vector kernel, for 1-33 activation rows (1-3 B tiles, 1-3 passes), with tail
    rows past the last 16, and for activations spread over 8 decades."""
    need_amx(fmt)
    w, s = weights(fmt, N, K)
    for M in (1, 2, 5, 6, 11, 15, 16, 33):              # 5 rows a B tile, 15 a pass: 1-3 tiles, 1-3 passes
        x = torch.randn(M, K, generator=G)
        ref = packed_linear_reference(x, w, s)
        torch.testing.assert_close(native.gemv(x, w, s, native.AMX), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(native.gemv(x, w, s), native.gemv(x, w, s, native.AMX))    # the default here
        wide = x * 10.0 ** (torch.rand(M, K, generator=G) * 8 - 6)
        ref = packed_linear_reference(wide, w, s)
        torch.testing.assert_close(native.gemv(wide, w, s, native.AMX), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("fmt,bound", [("int8", 2e-6), ("bf16", 1e-6)])
def test_amx_gemv_is_as_exact_as_fp32(fmt, bound):
    """Against the exact (float64) product of the stored weights, each output's error over sum |x w|
    stays at fp32's level (measured: 5e-7 int8, 2e-7 bf16; AVX-512 1e-7); two limbs instead of
    three give 2e-6 in bf16, ~1e-5 in int8."""
    need_amx(fmt)
    for N, K in [(37, 256), (64, 1024)]:
        w, s = weights(fmt, N, K)
        exact = w.double() if s is None else (w.double().view(N, s.shape[1], -1) * s.double().unsqueeze(-1)).view(N, K)
        x = torch.randn(6, K, generator=G)
        x = torch.cat([x, x * 10.0 ** (torch.rand(6, K, generator=G) * 8 - 6)])          # [12, K]: 3 B tiles
        for xs in (x[:2], x):                                   # each row gathered from C; C's rows whole
            err = (native.gemv(xs, w, s, native.AMX).double() - xs.double() @ exact.T).abs()
            assert (err / (xs.double().abs() @ exact.abs().T)).max() < bound


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_amx_gemv_propagates_nan_and_refuses_what_it_cannot_take(fmt):
    need_amx(fmt)
    w, s = weights(fmt, 40, 256)
    x = torch.randn(2, 256, generator=G)
    x[0, 7] = float("nan")
    y = native.gemv(x, w, s, native.AMX)
    assert y[0].isnan().all() and y[1].isfinite().all()
    bad = [(15, 256, 1), (40, 256, native.AMX_MAX_M + 1)] + ([(40, 160, 1)] if fmt == "int8" else [])  # 160: groups
    for N, K, M in bad:
        w, s = weights(fmt, N, K)
        with pytest.raises(ValueError, match="AMX"):
            native.gemv(torch.randn(M, K, generator=G), w, s, native.AMX)


def test_amx_request_without_amx_is_an_error():
    w16, _ = weights("fp16", 40, 256)                  # no AMX kernel for fp16 weights anywhere
    with pytest.raises(ValueError, match="AMX"):
        native.gemv(torch.randn(1, 256, generator=G), w16, None, native.AMX)
    if not AMX_HERE["int8"]:
        w, s = weights("int8", 40, 256)
        with pytest.raises(ValueError, match="AMX"):
            native.gemv(torch.randn(1, 256, generator=G), w, s, native.AMX)


class Big(nn.Module):
    def __init__(self, fmt: str = "int8"):
        super().__init__()
        self.small, self.big = Linear(64, 64), Linear(64, packed.NATIVE_IN_GRAPH // 64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=G) * 0.1)
        for lin in (self.small, self.big) if fmt != "fp32" else ():
            lin.pack(fmt)


def _two(m: Big, x: torch.Tensor) -> torch.Tensor:
    return m.big(torch.relu(m.small(x)))


def test_traced_graphs_call_the_native_gemv_for_large_weights_only_in_one_row_graphs(monkeypatch):
    m, x = Big(), torch.randn(1, 64, generator=G)
    calls = []
    real = native.binding

    def counted(dtype, isa=None):                  # the built GEMV, recording each weight's shape
        f = real(dtype, isa)
        return lambda x, w, *rest: calls.append(w.shape) or f(x, w, *rest)
    monkeypatch.setattr(native, "binding", counted)
    with torch.inference_mode():
        ref = packed_linear_reference(torch.relu(packed_linear_reference(x, m.small.weight, m.small.weight_scale_inv)),
                                      m.big.weight, m.big.weight_scale_inv)
        calls.clear()
        out = kernel(_two, "native-test")(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert calls and all(s == m.big.weight.shape for s in calls)    # the small one stayed inlined
    x3 = torch.randn(3, 64, generator=G)                            # batched: torch.compile's graph
    calls.clear()
    with torch.inference_mode():
        out = kernel(_two, "native-test")(m, dynamic(x3.clone(), 0))
        ref = packed_linear_reference(torch.relu(packed_linear_reference(x3, m.small.weight, m.small.weight_scale_inv)),
                                      m.big.weight, m.big.weight_scale_inv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert {tuple(s) for s in calls} == {tuple(m.small.weight.shape), tuple(m.big.weight.shape)}   # rows dynamic: all native


def test_traced_batch_graphs_take_the_native_gemv_for_fp32_weights_up_to_its_row_limit(monkeypatch):
    """A batch decode graph's fp32 Linears call dsv32::linear_rows, which takes the native GEMV up
    to GEMV_MAX_ROWS rows (torch's BLAS reads 5-7 GB/s there on AMD CPUs) and F.linear above."""
    m = Big("fp32")
    calls = []
    real = native.binding

    def counted(dtype, isa=None):
        f = real(dtype, isa)
        return lambda x, w, *rest: calls.append((x.shape[0], tuple(w.shape))) or f(x, w, *rest)
    monkeypatch.setattr(native, "binding", counted)
    ref = lambda x: m.big(torch.relu(m.small(x)))                 # noqa: E731 (autograd on: F.linear)
    for M, native_rows in ((3, True), (packed.GEMV_MAX_ROWS, True), (packed.GEMV_MAX_ROWS + 1, False)):
        x = torch.randn(M, 64, generator=G)
        expected = ref(x).detach()
        calls.clear()
        with torch.inference_mode():
            out = kernel(_two, "native-fp32-test")(m, dynamic(x.clone(), 0))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        shapes = {(M, tuple(m.small.weight.shape)), (M, tuple(m.big.weight.shape))}
        assert set(calls) == (shapes if native_rows else set()), M


def test_a_failed_build_fails_the_load_with_a_clear_error(monkeypatch, tmp_path, tiny_bf16):
    from dsv32.model.checkpoint import load_model
    from dsv32.model.cpu import build
    from dsv32.model.cpu.build import KernelError

    def broken(*a, **k):
        raise KernelError("cc1plus: fatal error")
    monkeypatch.setattr(native, "_built", {})
    monkeypatch.setattr(build, "CACHE", tmp_path)                # nothing built yet
    monkeypatch.setattr(build, "_compile", broken)
    with pytest.raises(KernelError, match="gemv.cpp.*cc1plus"):
        load_model(tiny_bf16, weight_format="int8", progress=False)
