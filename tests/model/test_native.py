"""model/cpu/native.py's attention kernels: the decode row's attention (cache write, indexer
top-k, sparse attention) over fp32, FP8 and bf16 pools, and the indexer's scores, against the
eager reference (each instruction-set variant, and AMX where the CPU has it)."""
import pytest
import torch

from dsv32.model.cpu import native
from dsv32.model.cpu.pages import Pages

G = torch.Generator().manual_seed(0)
CAPS = torch.backends.cpu.get_cpu_capability()
ISAS = [None, 1] + ([256] if CAPS in ("AVX2", "AVX512") else []) + ([512] if CAPS == "AVX512" else [])
AMX_INDEX = [native.AMX] if native._amx_index_ready() else []   # the indexer on tiles (FP8 pools)


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
