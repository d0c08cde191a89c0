"""Indexer scores/top-k and sparse absorbed MLA over the paged cache (torch and Triton backends)
against the model's own code: Indexer.select over PagedKV.index_keys and MLA.mqa_sparse."""
import pytest
import torch

from dsv32.engine.cache import PagedCache, PagedKV
from dsv32.kernels import paged
from dsv32.model.attention import MLA
from dsv32.model.config import ModelConfig

from .conftest import DEVICE, needs_triton, rel_err

CFG = dict(model_type="deepseek_v32", vocab_size=64, hidden_size=64, intermediate_size=64,
           moe_intermediate_size=32, num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=16,
           n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
           kv_lora_rank=128, q_lora_rank=32, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
           index_n_heads=16, index_head_dim=128, index_topk=8)
BS = 4                                                       # cache block size: many blocks per row
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def setup(fp8: bool, ctx: list[int], seed: int = 0, dtype=torch.float32):
    """An MLA with random weights and a paged cache holding random entries for rows of `ctx` keys
    in shuffled blocks: (mla, cache, tables, ctx tensor)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict(CFG)
    mla = MLA(cfg, 0).to(DEVICE, dtype)
    with torch.no_grad():
        for p in mla.parameters():
            p.normal_(0, p.shape[-1] ** -0.5) if p.dim() > 1 else p.normal_(1, 0.1)
    nb = max(-(-c // BS) for c in ctx) + 1
    cache = PagedCache(1, len(ctx) * nb + 2, 128, 64, 128, block_size=BS, dtype=dtype, device=DEVICE, fp8=fp8)
    tables = torch.randperm(cache.num_blocks, device=DEVICE)[: len(ctx) * nb].view(len(ctx), nb)
    for b, c in enumerate(ctx):
        slots = paged.key_slots(tables[b:b + 1], torch.arange(c, device=DEVICE)[None], BS)[0]
        cache.write(0, slots, torch.randn(c, 192, device=DEVICE, dtype=dtype),
                    torch.randn(c, 128, device=DEVICE, dtype=dtype))
    return mla, cache, tables, torch.tensor(ctx, device=DEVICE)


def ref_kv(cache, tables, ctx, T):
    return PagedKV(cache, tables, ctx, torch.full((len(ctx), T), -1, device=DEVICE))


def same_selection(ids, ref_ids, ref_scores, tol=1e-5):
    """Both picked the same number of keys per query, and the reference scores of the picked keys
    equal the reference's top values (ties may pick different keys)."""
    assert ((ids >= 0).sum(-1) == (ref_ids >= 0).sum(-1)).all()
    def vals(i):
        v = ref_scores.gather(-1, i.clamp(min=0)).masked_fill(i < 0, float("-inf"))
        return v.sort(-1, descending=True).values
    a, b = vals(ids), vals(ref_ids)
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin)
    assert ((a[fin] - b[fin]).abs() <= tol * b[fin].abs().clamp(min=1)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fp8,ctx,T", [(True, [21, 9], 1), (False, [13, 30], 3), (True, [40], 5)])
def test_indexer_matches_model(backend, fp8, ctx, T):
    mla, cache, tables, ctx_t = setup(fp8, ctx, seed=len(ctx) * T)
    B, H = len(ctx), 16
    q = torch.randn(B, T, H, 128, device=DEVICE)
    w = torch.randn(B, T, H, device=DEVICE)
    pos = (ctx_t.unsqueeze(1) - T + torch.arange(T, device=DEVICE)).clamp(min=0)   # last T tokens
    keys = ref_kv(cache, tables, ctx_t, T).index_keys(0)                          # [B, S, Di]
    S = keys.shape[1]
    ref_ids = mla.indexer.select(q, w, keys, pos)
    ref_scores = mla.indexer.scores(q, w, keys).masked_fill(
        torch.arange(S, device=DEVICE) > pos.unsqueeze(-1), float("-inf"))
    scores = paged.indexer_scores(q, w, cache, 0, tables, pos, S, backend)
    fin = torch.isfinite(ref_scores)
    assert torch.equal(torch.isfinite(scores), fin)
    assert rel_err(scores[fin], ref_scores[fin]) < 1e-5
    same_selection(paged.topk_ids(scores, mla.indexer.topk), ref_ids, ref_scores)
    wide = paged.indexer_scores(q, w, cache, 0, tables, pos, tables.shape[1] * BS, backend)
    assert torch.equal(wide[..., :S].isfinite(), fin) and (wide[..., S:] == float("-inf")).all()
    assert rel_err(wide[..., :S][fin], scores[fin]) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fp8,ctx,T,K", [(True, [21, 9], 1, 8), (False, [30], 2, 20), (True, [37, 40], 2, 33)])
def test_sparse_mla_matches_model(backend, fp8, ctx, T, K):
    mla, cache, tables, ctx_t = setup(fp8, ctx, seed=K)
    B, H = len(ctx), 16
    q_nope = torch.randn(B, T, H, 32, device=DEVICE)
    q_pe = torch.randn(B, T, H, 64, device=DEVICE)
    idx = torch.stack([torch.stack([torch.randperm(c, device=DEVICE)[:K] for _ in range(T)]) for c in ctx])
    idx[..., -2:] = -1                                            # empty slots (short rows)
    ref = mla.mqa_sparse(q_nope, q_pe, ref_kv(cache, tables, ctx_t, T), idx)
    w_uk, w_uv = mla._wkv_b(torch.float32)
    q = torch.cat((torch.einsum("bthn,hnc->bthc", q_nope, w_uk), q_pe), -1)
    o_lat = paged.sparse_mla(q, idx, cache, 0, tables, mla.scale, backend)
    assert o_lat.shape == (B, T, H, 128)
    assert rel_err(torch.einsum("bthc,hvc->bthv", o_lat, w_uv), ref) < 1e-5


@needs_triton
def test_sparse_mla_splits_merge_exactly():
    """Splitting the keys across programs (flash-decoding) and merging by log-sum-exp gives the
    one-program result."""
    from dsv32.kernels.triton.sparse_mla import sparse_mla
    mla, cache, tables, _ = setup(True, [64], seed=5)
    q = torch.randn(1, 1, 16, 192, device=DEVICE)
    idx = torch.randperm(64, device=DEVICE)[:48].view(1, 1, 48)
    one = sparse_mla(q, idx, cache, 0, tables, 0.1, splits=1)
    many = sparse_mla(q, idx, cache, 0, tables, 0.1, block_k=16, splits=3)
    assert rel_err(many, one) < 1e-6


@pytest.mark.parametrize("fp8", [False, True])
def test_write_with_padding_rows(fp8):
    """Padding rows (slot -1) leave the cache as the real rows alone would."""
    _, cache, tables, _ = setup(fp8, [8, 8])
    _, other, _, _ = setup(fp8, [8, 8])
    slots = torch.tensor([[5, 6, -1], [-1, -1, -1]], device=DEVICE)
    lat, ik = torch.randn(2, 3, 192, device=DEVICE), torch.randn(2, 3, 128, device=DEVICE)
    paged.write(cache, 0, slots, lat, ik)
    other.write(0, slots[0, :2], lat[0, :2], ik[0, :2])
    for name in ("c", "c_scale", "pe", "ik", "ik_scale") if fp8 else ("lat", "ik"):
        a, b = getattr(cache, name), getattr(other, name)
        assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a,
                           b.view(torch.uint8) if b.dtype.itemsize == 1 else b), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_cache_and_queries(backend):
    """bf16 compute over an FP8 cache (the GPU deployment): within bf16 rounding of the model's
    code run on the same bf16 inputs."""
    mla, cache, tables, ctx_t = setup(True, [33, 20], seed=7, dtype=torch.bfloat16)
    B, T, H = 2, 2, 16
    pos = ctx_t.unsqueeze(1) - T + torch.arange(T, device=DEVICE)
    q = torch.randn(B, T, H, 128, device=DEVICE).bfloat16()
    w = torch.randn(B, T, H, device=DEVICE)
    keys = ref_kv(cache, tables, ctx_t, T).index_keys(0)
    ref = mla.indexer.scores(q, w, keys).masked_fill(
        torch.arange(keys.shape[1], device=DEVICE) > pos.unsqueeze(-1), float("-inf"))
    got = paged.indexer_scores(q, w, cache, 0, tables, pos, keys.shape[1], backend)
    fin = ref.isfinite()
    assert torch.equal(got.isfinite(), fin) and rel_err(got[fin], ref[fin]) < 1e-2
    q_nope, q_pe = torch.randn(B, T, H, 32, device=DEVICE).bfloat16(), torch.randn(B, T, H, 64, device=DEVICE).bfloat16()
    idx = paged.topk_ids(ref, 16)
    out = mla.mqa_sparse(q_nope, q_pe, ref_kv(cache, tables, ctx_t, T), idx)
    w_uk, w_uv = mla._wkv_b(torch.bfloat16)
    qa = torch.cat((torch.einsum("bthn,hnc->bthc", q_nope, w_uk), q_pe), -1)
    o = torch.einsum("bthc,hvc->bthv", paged.sparse_mla(qa, idx, cache, 0, tables, mla.scale, backend), w_uv)
    assert o.dtype == torch.bfloat16 and rel_err(o, out) < 2e-2
