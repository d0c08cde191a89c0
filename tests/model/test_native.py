"""model/cpu/native.py: the native packed GEMV (each instruction-set variant) against the slow
reference (dequantise, then F.linear), and where packed_linear uses it."""
import pytest
import torch
from torch import nn

from dsv32.model.cpu import native, packed
from dsv32.model.cpu.compile import dynamic, kernel
from dsv32.model.cpu.packed import packed_linear, packed_linear_reference, quantize_int8
from dsv32.model.cpu.pages import Pages
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
    real = native.gemv
    monkeypatch.setattr(native, "gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
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
AMX_INDEX = [native.AMX] if native._amx_index_ready() else []   # the indexer on tiles (FP8 pools)


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


def _paged(latents: torch.Tensor, index_keys: torch.Tensor, block: int) -> Pages:
    """Keys [S, .] in position order spread over the blocks of larger pools in shuffled order, as
    the paged cache keeps them; the last key's row left as noise (the kernel writes it)."""
    S = latents.shape[0]
    nb = -(-S // block)
    table = torch.randperm(nb + 3, generator=G)[:nb]
    pools = [torch.randn((nb + 3) * block, t.shape[1], generator=G) for t in (latents, index_keys)]
    for i, t in enumerate(table.tolist()):
        for pool, keys in zip(pools, (latents, index_keys)):
            part = keys[i * block:min((i + 1) * block, S - 1)]
            pool[t * block:t * block + part.shape[0]] = part
    return Pages(*pools, table, block)


def _mla(H: int, Hi: int, Di: int, topk: int, C: int, R: int):
    from dsv32.model.attention import MLA
    from dsv32.model.config import ModelConfig
    return MLA(ModelConfig.from_dict(dict(
        model_type="deepseek_v32", vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=1, first_k_dense_replace=1, num_attention_heads=H, num_key_value_heads=H, n_routed_experts=4, n_group=1,
        topk_group=1, num_experts_per_tok=2, kv_lora_rank=C, q_lora_rank=32, qk_rope_head_dim=R,
        qk_nope_head_dim=16, v_head_dim=16, index_n_heads=Hi, index_head_dim=Di, index_topk=topk)), 0)


def _eager(a, latents, index_keys, q, iq, iw) -> torch.Tensor:
    """MLA.decode_select + MLA.attend_latent of the last key's row over keys [S, .] -> o_lat [H, C]."""
    from dsv32.model.kv import FreshKV
    kv = FreshKV()
    kv.write(0, latents[None], index_keys[None])
    sel = a.decode_select(iq[None, None], iw[None, None], kv, torch.tensor([[latents.shape[0] - 1]]))
    return a.attend_latent(q[None, None], kv, sel)[0, 0]


@pytest.mark.parametrize("H,Hi,Di,S,topk,block", [(4, 16, 32, 1000, 256, 64), (3, 17, 32, 130, 7, 64),
                                                  (16, 16, 32, 300, 300, 300), (5, 16, 32, 40, 64, 16),
                                                  (4, 16, 32, 1, 8, 64), (4, 16, 40, 200, 20, 64), (38, 16, 32, 500, 100, 64)])
def test_native_decode_attention_equals_the_eager_path(H, Hi, Di, S, topk, block):
    """One row at key position S - 1 over keys read through a block table: the cache rows it wrote,
    and its output against MLA.decode_select + MLA.attend_latent (16+ indexer heads: no ties). Di 32:
    the indexer's 16-key tiles where a block has 16 keys left, key by key after; Di 40: key by key."""
    C, R = 64, 16
    a = _mla(H, Hi, Di, topk, C, R)
    latents, index_keys = torch.randn(S, C + R, generator=G) * 3, torch.randn(S, Di, generator=G)
    q, iq, iw = torch.randn(H, C + R, generator=G), torch.randn(Hi, Di, generator=G), torch.randn(Hi, generator=G)
    ref = _eager(a, latents, index_keys, q, iq, iw)
    pages = _paged(latents, index_keys, block)
    out = native.decode_attention(latents[-1], index_keys[-1], q, iq, iw, pages, S, topk, a.scale, C)
    # 5e-5: a softmax over up to 256 logits of size ~10 turns their fp32 rounding (~1e-6, in another
    # summation order) into up to ~1.5e-5 at the output for some draws (seen: the index-score gap at
    # the top-k boundary was 0.018, so no selection differed)
    torch.testing.assert_close(out, ref, rtol=5e-5, atol=5e-5)
    slot = int(pages.table[(S - 1) // block]) * block + (S - 1) % block
    assert torch.equal(pages.latent[slot], latents[-1]) and torch.equal(pages.index[slot], index_keys[-1])
    for isa in ISAS[1:]:                                 # each instruction-set variant, the same
        out_isa = native.decode_attention(latents[-1], index_keys[-1], q, iq, iw, pages, S, topk, a.scale, C, isa)
        torch.testing.assert_close(out_isa, ref, rtol=5e-5, atol=5e-5)
    with pytest.raises(ValueError, match="decode_attention"):
        native.decode_attention(latents[-1], index_keys[-1], q, iq, iw, pages._replace(block=0), S, topk, a.scale, C)
    with pytest.raises(ValueError, match="decode_attention"):         # the table covers too few keys
        native.decode_attention(latents[-1], index_keys[-1], q, iq, iw, pages, pages.table.numel() * block + 1,
                                topk, a.scale, C)


def _paged_fp8(latents: torch.Tensor, index_keys: torch.Tensor, block: int, C: int) -> Pages:
    """`_paged` in the FP8 layout of engine/cache.py (quantize_groups: the reference of the writes)."""
    from dsv32.model.fp8 import quantize_groups
    p = _paged(latents, index_keys, block)
    c, c_scale = quantize_groups(p.latent[:, :C])
    ik, ik_scale = quantize_groups(p.index)
    return Pages(c, ik, p.table, block, c_scale, p.latent[:, C:].to(torch.bfloat16), ik_scale)


def _e4m3_probes(n: int) -> torch.Tensor:
    """n values x with x / scale (scale 1: each group of 128 starts with 448) at every e4m3 value,
    at every midpoint between neighbours (ties to even), both signs, then random."""
    vals = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()      # 0 .. 448
    probes = torch.cat((vals, (vals[1:] + vals[:-1]) / 2))
    probes = torch.cat((probes, -probes, torch.randn(n, generator=G) * 100))
    out = torch.empty(n // 128, 128)
    out[:, 0] = 448.0
    out[:, 1:] = probes[:out[:, 1:].numel()].view(n // 128, 127)
    return out.flatten()


@pytest.mark.parametrize("H,Hi,S,topk,block", [(4, 16, 700, 256, 64), (3, 17, 100, 128, 16), (4, 16, 2, 8, 64)])
def test_native_decode_attention_over_an_fp8_cache(H, Hi, S, topk, block):
    """The FP8 pools (e4m3 + a scale per 128, bf16 rope): the bytes the kernel writes are
    quantize_groups' (every e4m3 value and midpoint probed), and its output is the eager path's over
    the dequantised keys."""
    from dsv32.model.fp8 import dequantize_groups, quantize_groups
    G.manual_seed(S)          # the same draws in any test order (some make the 2-key softmax ill-conditioned)
    C, R, Di = 512, 64, 128
    a = _mla(H, Hi, Di, topk, C, R)
    latents, index_keys = torch.randn(S, C + R, generator=G) * 3, torch.randn(S, Di, generator=G)
    latents[-1, :C] = _e4m3_probes(C)
    q, iq, iw = torch.randn(H, C + R, generator=G) * 0.1, torch.randn(Hi, Di, generator=G), torch.randn(Hi, generator=G)
    pages = _paged_fp8(latents, index_keys, block, C)
    # the keys as the cache holds them, in fp32
    stored_lat = torch.cat((dequantize_groups(*quantize_groups(latents[:, :C]), torch.float32),
                            latents[:, C:].to(torch.bfloat16).float()), -1)
    stored_ik = dequantize_groups(*quantize_groups(index_keys), torch.float32)
    ref = _eager(a, stored_lat, stored_ik, q, iq, iw)
    slot = int(pages.table[(S - 1) // block]) * block + (S - 1) % block
    want = [t[-1] for t in (*quantize_groups(latents[:, :C]), latents[:, C:].to(torch.bfloat16), *quantize_groups(index_keys))]
    for isa in ISAS + AMX_INDEX:
        for t in pages[:2] + pages[4:]:
            t[slot] = 0
        out = native.decode_attention(latents[-1], index_keys[-1], q, iq, iw, pages, S, topk, a.scale, C, isa)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        got = [pages.latent[slot], pages.latent_scale[slot], pages.rope[slot], pages.index[slot], pages.index_scale[slot]]
        for g, w in zip(got, want):
            assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), isa
    with pytest.raises(ValueError, match="decode_attention"):                 # a pool of the wrong layout
        native.decode_attention(latents[-1], index_keys[-1], q, iq, iw, pages._replace(rope=pages.rope.float()), S,
                                topk, a.scale, C)


@pytest.mark.parametrize("H,Hi,S,topk,block", [(4, 16, 700, 256, 64), (3, 17, 100, 128, 16), (4, 16, 2, 8, 64)])
def test_native_decode_attention_over_a_bf16_cache(H, Hi, S, topk, block):
    """bf16 pools (kv_cache_dtype bfloat16): the kernel writes the new row rounded to nearest even
    (as torch's .to(bfloat16)), and its output is the eager path's over the keys in bf16."""
    G.manual_seed(S)
    C, R, Di = 512, 64, 128
    a = _mla(H, Hi, Di, topk, C, R)
    latents, index_keys = torch.randn(S, C + R, generator=G) * 3, torch.randn(S, Di, generator=G)
    latents[-1, :4] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3e-39])   # ties both ways, subnormal
    q, iq, iw = torch.randn(H, C + R, generator=G) * 0.1, torch.randn(Hi, Di, generator=G), torch.randn(Hi, generator=G)
    p = _paged(latents, index_keys, block)
    pages = p._replace(latent=p.latent.to(torch.bfloat16), index=p.index.to(torch.bfloat16))
    stored_lat, stored_ik = latents.to(torch.bfloat16), index_keys.to(torch.bfloat16)
    ref = _eager(a, stored_lat.float(), stored_ik.float(), q, iq, iw)
    slot = int(pages.table[(S - 1) // block]) * block + (S - 1) % block
    for isa in ISAS + AMX_INDEX:
        pages.latent[slot], pages.index[slot] = 0, 0
        out = native.decode_attention(latents[-1], index_keys[-1], q, iq, iw, pages, S, topk, a.scale, C, isa)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(pages.latent[slot].view(torch.int16), stored_lat[-1].view(torch.int16)), isa
        assert torch.equal(pages.index[slot].view(torch.int16), stored_ik[-1].view(torch.int16)), isa
    with pytest.raises(ValueError, match="decode_attention"):                 # pools of two dtypes
        native.decode_attention(latents[-1], index_keys[-1], q, iq, iw, pages._replace(index=p.index), S, topk,
                                a.scale, C)


BOUND = 1.2e-7             # of sum_h |w_h| sum_d |q_hd k_d|: fp32's rounding (<= 6.2e-8 seen, scalar code); two limbs 3.3e-7


@pytest.mark.parametrize("Hi,S,block", [(8, 1000, 64), (16, 300, 16), (24, 130, 64), (64, 200, 64), (65, 70, 64),
                                        (5, 37, 64), (8, 300, 16), (8, 5000, 64)])   # last: threads share chunks
@pytest.mark.parametrize("pool", ["fp32", "bf16", "fp8"])
def test_native_index_scores_equal_the_indexer(Hi, S, block, pool):
    """The scores decode_attention selects from, each instruction-set variant (and AMX tiles over an
    FP8 pool, where the CPU has AMX-BF16), against the indexer's formula in float64 over the keys as
    the pool holds them: within BOUND of sum_h |w_h| sum_d |q_hd k_d| (the AMX kernel's query in two
    bf16 limbs instead of three misses it). The FP8 keys take every e4m3 value, both signs
    (subnormals included: a table that zeroes them misses it too)."""
    from dsv32.model.fp8 import dequantize_groups, quantize_groups
    Di, fp8 = 128, pool == "fp8"
    keys = torch.randn(S, Di, generator=G) * 4
    if fp8:
        keys[:2] = _e4m3_probes(256).view(2, Di)[:, torch.randperm(Di, generator=G)] / 448 * 3
    iq, iw = torch.randn(Hi, Di, generator=G), torch.randn(Hi, generator=G)
    pages = _paged(torch.zeros(S, 1), keys, block)
    pages.index[int(pages.table[(S - 1) // block]) * block + (S - 1) % block] = keys[-1]   # (left as noise)
    if fp8:
        ik, ik_scale = quantize_groups(pages.index)
        pages = pages._replace(index=ik, index_scale=ik_scale)
        keys = dequantize_groups(*quantize_groups(keys), torch.float32)
    if pool == "bf16":
        pages = pages._replace(index=pages.index.to(torch.bfloat16))
        keys = keys.to(torch.bfloat16).float()
    exact = (iw.double()[:, None] * (iq.double() @ keys.double().T).relu()).sum(0)
    bound = BOUND * (iw.double().abs()[:, None] * (iq.double().abs() @ keys.double().abs().T)).sum(0)
    for isa in ISAS + (AMX_INDEX if pool != "fp32" and Hi <= 64 else []):
        err = (native.index_scores(iq, iw, pages, S, isa).double() - exact).abs()
        assert bool((err <= bound).all()), (isa, float((err / bound).max()))
    if AMX_INDEX and pool == "fp32" and Hi <= 64:      # the AMX build scores fp32 pools on the vector path
        assert torch.equal(native.index_scores(iq, iw, pages, S, native.AMX), native.index_scores(iq, iw, pages, S, 512))
    with pytest.raises(ValueError, match="index_scores"):
        native.index_scores(iq, iw, pages, pages.table.numel() * block + 1)
    with pytest.raises(ValueError, match="index_scores"):
        native.index_scores(iq, iw[:-1], pages, S)


def test_a_failed_amx_index_build_falls_back_to_the_vector_code_with_a_warning(monkeypatch):
    """Where amx_index.cpp does not build (an older compiler), FP8 pools are scored by the AVX-512
    code, and a warning says so."""
    from dsv32.model.cpu.build import KernelError
    real = native._build

    def no_amx(files, defines, args):
        if "AMX" in defines and "amx_index.cpp" in files:
            raise KernelError("could not build amx_index.cpp: unknown option -mamx-bf16")
        return real(files, defines, args)
    monkeypatch.setattr(native, "_build", no_amx)
    monkeypatch.setattr(native, "_has_amx", lambda dtype: True)
    native._amx_index_ready.cache_clear()
    try:
        with pytest.warns(UserWarning, match="AVX-512 code, not on AMX tiles.*mamx-bf16"):
            assert native._index_defines(None, tiled=True) == []
        assert native._index_defines(None, tiled=False) == [] and native._index_defines(512, tiled=True) == ["ISA 512"]
    finally:
        native._amx_index_ready.cache_clear()


def test_amx_index_needs_vbmi(monkeypatch):
    """The AMX indexer converts the e4m3 keys with VBMI's byte lookups: a CPU with AMX-BF16 but
    without VBMI scores FP8 pools with the vector code (and builds nothing that would fault)."""
    monkeypatch.setattr(native, "_has_amx", lambda dtype: True)
    monkeypatch.setattr(native.build, "cpu_flags", lambda: frozenset({"amx_tile", "amx_bf16", "avx512_bf16"}))
    native._amx_index_ready.cache_clear()
    try:
        assert not native._amx_index_ready() and native._index_defines(None, tiled=True) == []
    finally:
        native._amx_index_ready.cache_clear()


@pytest.mark.skipif(not AMX_INDEX, reason="no AMX-BF16 here")
@pytest.mark.parametrize("pool", ["fp8", "bf16"])
@pytest.mark.parametrize("t,H,n", [(50, 8, 1000), (37, 24, 333), (9, 64, 130), (3, 5, 17), (30, 16, 64)])
def test_native_index_scores_rows_equal_the_indexer(t, H, n, pool):
    """A prefill's queries over consecutive FP8 or bf16 keys on AMX tiles (native.index_scores_rows,
    which cpu/indexer.index_scores takes for such runs with 16+ heads), written into a column slice
    of a wider score matrix, against the indexer's formula in float64: within BOUND, every e4m3 value
    among the FP8 keys, nothing outside the slice written."""
    from dsv32.model.fp8 import dequantize_groups, quantize_groups
    from dsv32.model.cpu.indexer import FP8Keys, index_scores
    keys = torch.randn(n, 128, generator=G) * 4
    if pool == "fp8":
        keys[:2] = _e4m3_probes(256).view(2, 128)[:, torch.randperm(128, generator=G)] / 448 * 3
        values, scales = quantize_groups(keys)
        exact_keys = dequantize_groups(values, scales, torch.float32).double()
        halves = [FP8Keys(values[:n // 2], scales[:n // 2]), FP8Keys(values[n // 2:], scales[n // 2:])]
    else:
        values, scales = keys.to(torch.bfloat16), None
        exact_keys = values.double()
        halves = [values[:n // 2], values[n // 2:]]
    q, w = torch.randn(t, H, 128, generator=G), torch.randn(t, H, generator=G)
    exact = (w.double()[:, :, None] * torch.einsum("thd,sd->ths", q.double(), exact_keys).relu()).sum(1)
    bound = BOUND * (w.double().abs()[:, :, None] * torch.einsum("thd,sd->ths", q.double().abs(), exact_keys.abs())).sum(1)
    out = torch.full((t, n + 7), float("nan"))
    native.index_scores_rows(q, w, values, scales, out[:, 3:3 + n])
    assert bool(((out[:, 3:3 + n].double() - exact).abs() <= bound).all())
    assert bool(out[:, :3].isnan().all() and out[:, 3 + n:].isnan().all())
    via_runs = index_scores(q, w, [(0, halves[0]), (n // 2, halves[1])], n)
    if H >= 16:                                       # index_scores takes the same kernel: a key's score is its own
        assert torch.equal(via_runs, out[:, 3:3 + n])
    else:                                             # ... fewer heads: the fp32 GEMM over converted blocks
        assert bool(((via_runs.double() - exact).abs() <= bound).all())
    with pytest.raises(ValueError, match="index_scores_rows"):
        native.index_scores_rows(q, w, values, scales, out[:, :n - 1])
