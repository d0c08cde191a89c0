"""Attention-side fast paths against their references: indexer scoring over key runs (views of a
paged cache, fragmented block tables, FP8 caches) and the SERVED choice of dense-masked attention."""
import pytest
import torch

from dsv32.engine.cache import MIN_RUN_BLOCKS, PagedCache, PagedKV
from dsv32.model import attention
from dsv32.model.attention import Attention, Indexer
from dsv32.model.init_tiny import tiny_config
from dsv32.model.cpu import indexer as kindexer, native
from dsv32.model.cpu.indexer import index_scores, runs_of
from dsv32.model.transformer import Transformer

from .test_native import ISAS                                           # the vector widths here

G = torch.Generator().manual_seed(0)
CFG = tiny_config(topk=16, index_heads=16, index_dim=128, kv_lora=128, vocab=1024)   # 16 heads: no exact-zero ties


def indexer():
    return Indexer(CFG).eval()


def query(B, T):
    H, D = CFG.index_n_heads, CFG.index_head_dim
    return torch.randn(B, T, H, D, generator=G), torch.randn(B, T, H, generator=G)


@pytest.mark.parametrize("native_sum", [True, False])
def test_blocked_scores_equal_reference_scores(monkeypatch, native_sum):
    """Scores over key runs, each block's head sum in native.head_sum or by relu_ and a bmm."""
    monkeypatch.setattr(kindexer, "SCORE_BYTES", 4 * 5 * 4 * 512)       # blocks of 512 keys
    if not native_sum:
        monkeypatch.setattr(kindexer, "has_compiler", lambda: False)
        monkeypatch.setattr(native, "head_sum", None)                   # not called
    q, w = query(1, 5)
    keys = torch.randn(1, 3000, 128, generator=G)
    want = Indexer.scores(q, w, keys)[0]
    got = index_scores(q[0], w[0], runs_of(keys)[0], 3000)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # scattered positions (a gathered run) land where they belong; missing keys are -inf
    pos = torch.tensor([7, 2, 40])
    got = index_scores(q[0], w[0], [(pos, keys[0, pos])], 50)
    torch.testing.assert_close(got[:, pos], want[:, pos], rtol=1e-5, atol=1e-5)
    assert torch.isinf(got[:, 3]).all()
    # runs of consecutive keys out of order, with gaps before, between and after them: -inf there
    got = index_scores(q[0], w[0], [(600, keys[0, 600:900]), (10, keys[0, 10:500])], 1000)
    held = torch.zeros(1000, dtype=torch.bool)
    held[10:500] = held[600:900] = True
    torch.testing.assert_close(got[:, held], want[:, :1000][:, held], rtol=1e-5, atol=1e-5)
    assert torch.isinf(got[:, ~held]).all() and (got[:, ~held] < 0).all()


def test_fast_select_equals_reference_with_causal_and_empty_slots():
    ix = indexer()
    q, w = query(2, 12)
    keys = torch.randn(2, 12, 128, generator=G)
    pos = torch.arange(12).expand(2, 12)
    got = ix.select(q, w, keys, pos)
    assert torch.equal(got, ix.select_reference(q, w, keys, pos))
    assert (got[:, 3] == -1).sum(-1).tolist() == [8, 8]                  # 4 visible keys in 12 slots


def brute_topk(scores: torch.Tensor, limit: int, k: int) -> list[int]:
    """The k best of scores[:limit] (the greater score, then the lower id; never -inf or NaN),
    ascending, -1 after them: one sort per row, as the definition reads."""
    order = sorted((i for i in range(limit) if scores[i] > float("-inf")), key=lambda i: (-scores[i].item(), i))
    return sorted(order[:k]) + [-1] * (k - min(k, len(order)))


def score_rows(S: int) -> dict[str, torch.Tensor]:
    """Rows of S scores that stress a sampled threshold: ties, -inf, NaN, monotone runs, and
    winners only where an evenly spaced sample does (or does not) look."""
    r = torch.randn(S, generator=G)
    sampled_big = torch.zeros(S)
    sampled_big[::8] = 1.0 + torch.rand(len(range(0, S, 8)), generator=G)
    unsampled_big = torch.rand(S, generator=G) + 1.0
    unsampled_big[::4] = 0.0
    ties = torch.randint(0, 3, (S,), generator=G).float()
    holes = r.clone()
    holes[torch.rand(S, generator=G) < 0.5] = float("-inf")
    holes[5] = float("nan")
    return {"random": r, "increasing": torch.arange(S).float(), "decreasing": -torch.arange(S).float(),
            "constant": torch.zeros(S), "ties": ties, "holes": holes, "sampled_big": sampled_big,
            "unsampled_big": unsampled_big, "all_inf": torch.full((S,), float("-inf"))}


@pytest.mark.parametrize("S,k", [(3000, 16), (3000, 700), (500, 256), (64, 16), (20, 16)])
def test_native_topk_rows_equals_the_definition(S, k):
    """The native causal top-k: the k best visible ids per row (ties to the lower id, never a
    -inf or NaN score), for rows shaped to defeat its sampled threshold; and on index scores the
    same selection as the torch reference."""
    rows = score_rows(S)
    scores = torch.stack(list(rows.values()))
    for limit in (S, S // 2 + 3, k - 1, 1, 0):
        limits = torch.full((len(rows),), limit)
        want = [brute_topk(row, limit, k) for row in scores]
        for isa in ISAS:                                                 # every vector width
            got = native.topk_rows(scores, limits, k, isa)
            for name, ids, w in zip(rows, got, want):
                assert ids.tolist() == w, (name, limit, isa)
    q, w = torch.randn(40, 16, 128, generator=G), torch.rand(40, 16, generator=G)    # no exact-zero ties
    scores = index_scores(q, w, runs_of(torch.randn(1, S, 128, generator=G))[0], S)
    pos = torch.arange(S - 40, S) if S >= 40 else torch.arange(40) % S
    want = kindexer.causal_topk_reference(scores.clone(), pos, k)
    got = kindexer.causal_topk(scores.clone(), pos, k)
    # exact fp32 ties at the k-th score do occur (torch.topk takes either): equal selected scores
    def chosen(ids):                                                     # selected scores, sorted
        return scores.gather(1, ids.clamp(min=0)).masked_fill(ids < 0, float("-inf")).sort(-1).values
    assert torch.equal(chosen(got), chosen(want))
    with pytest.raises(ValueError, match="topk_rows: unsupported scores"):
        native.topk_rows(scores.double(), pos, k)


@pytest.mark.parametrize("isa", ISAS)
def test_native_head_sum_rows_apart_and_bad_shapes(isa):
    s, w = torch.randn(3 * 4, 37, generator=G), torch.randn(3, 4, generator=G)
    out = torch.full((3, 50), 7.0)
    native.head_sum(s, w, out[:, 5:42], isa)                             # rows 50 apart
    want = (w[:, :, None] * s.view(3, 4, 37).relu()).sum(1)
    torch.testing.assert_close(out[:, 5:42], want, rtol=1e-6, atol=1e-6)
    assert (out[:, :5] == 7).all() and (out[:, 42:] == 7).all()
    with pytest.raises(ValueError, match="head_sum: unsupported"):
        native.head_sum(s[:, :36], w, out[:, :37])


def test_causal_topk_without_a_compiler_takes_torch_topk(monkeypatch):
    scores = torch.randn(3, 100, generator=G)
    pos = torch.tensor([99, 50, 5])
    want = native.topk_rows(scores, pos + 1, 10)
    monkeypatch.setattr(kindexer, "has_compiler", lambda: False)
    monkeypatch.setattr(native, "topk_rows", None)                       # not called
    assert torch.equal(kindexer.causal_topk(scores.clone(), pos, 10), want)


LAYOUTS = {"fp32": {}, "bf16": dict(storage=torch.bfloat16), "fp8": dict(fp8=True)}   # PagedCache's pools


def paged(layout: str, tables: list[list[int]], lens: list[int], T: int):
    """A paged cache (`layout`: a key of LAYOUTS) with random keys in every slot and a PagedKV over
    it, `T` new tokens per row."""
    cache = PagedCache(1, 40, CFG.kv_lora_rank, CFG.qk_rope_head_dim, CFG.index_head_dim, **LAYOUTS[layout])
    slots = torch.arange(40 * 64)
    cache.write(0, slots, torch.randn(len(slots), CFG.kv_lora_rank + CFG.qk_rope_head_dim, generator=G),
                torch.randn(len(slots), CFG.index_head_dim, generator=G))
    nb = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (nb - len(t)) for t in tables])
    ctx = torch.tensor(lens)
    pos = torch.stack([torch.arange(n - T, n) for n in lens])
    write = torch.gather(bt, 1, pos // 64) * 64 + pos % 64
    return PagedKV(cache, bt, ctx, write), pos


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("T", [1, 9])
def test_paged_runs_select_equals_gathered_reference(layout, T):
    # row 0: long runs and short ones (gathered), row 1: one run and a shorter context
    tables = [[5, 6, 7, 8, 9, 0, 12, 3, 20, 21, 22, 23, 24, 25, 1], [30, 31, 32, 33, 34, 35]]
    kv, pos = paged(layout, tables, [15 * 64 - 10, 6 * 64 - 1], T)
    fp8 = layout == "fp8"
    runs = kv.index_runs(0)
    assert MIN_RUN_BLOCKS == 4 and [len(r) for r in runs] == [3, 1]      # 2 long runs + 1 gathered
    assert isinstance(runs[0][2][0], torch.Tensor)
    view = runs[1][0][1].values if fp8 else runs[1][0][1]                 # a view (FP8: values and scales)
    assert view.data_ptr() == kv.cache.ik[0, 30 * 64].data_ptr()
    ix = indexer()
    q, w = query(2, T)
    got = ix.select(q, w, runs, pos, None, kv.num_keys(0))
    want = ix.select_reference(q, w, kv.index_keys(0), pos)
    assert torch.equal(got, want)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_native_sparse_prefill_equals_the_gathered_path(layout, monkeypatch):
    """MLA.mqa_sparse over a paged cache: each query's selected rows read in place
    (native.sparse_prefill) == gathered for batched matmuls, fp32, bf16 and FP8 pools alike."""
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    model.init_weights(std=0.05)
    mla = model.model.layers[0].self_attn
    kv, pos = paged(layout, [[5, 6, 7, 8, 9, 0, 12, 3], [30, 31, 32]], [8 * 64 - 10, 3 * 64 - 1], 9)
    H, K = CFG.num_attention_heads, 16
    q_nope = torch.randn(2, 9, H, CFG.qk_nope_head_dim, generator=G)
    q_pe = torch.randn(2, 9, H, CFG.qk_rope_head_dim, generator=G)
    idx = torch.stack([torch.stack([torch.randperm(int(p) + 1, generator=G)[:K] for p in row]) for row in pos])
    idx[0, 2, 10:] = -1                                                  # empty slots
    idx[1, 4, :15] = -1
    got = mla.mqa_sparse(q_nope, q_pe, kv, idx)
    taken = []
    real = native.sparse_prefill
    monkeypatch.setattr(native, "sparse_prefill", lambda *a: taken.append(1) or real(*a))
    assert torch.equal(mla.mqa_sparse(q_nope, q_pe, kv, idx), got) and len(taken) == 2     # one call a row
    monkeypatch.setattr(attention.MLA, "_pages", lambda self, q, kv: None)
    torch.testing.assert_close(got, mla.mqa_sparse(q_nope, q_pe, kv, idx), rtol=1e-5, atol=1e-5)
    pages = kv.pages(0, 1)[0]
    q = torch.randn(3, H, CFG.kv_lora_rank + CFG.qk_rope_head_dim, generator=G)
    ids = torch.tensor([[-1] * 40, [-1] * 20 + [5] + [-1] * 19, [3] + [-1] * 39])   # all empty: zeros; one key
    o = real(q, ids, pages, 0.1, CFG.kv_lora_rank)
    assert (o[0] == 0).all() and torch.isfinite(o).all()
    torch.testing.assert_close(o[1], real(q[1:2], torch.tensor([[5]]), pages, 0.1, CFG.kv_lora_rank)[0])
    wide = torch.randint(0, 8 * 64 - 10, (5, 40), generator=G)           # full tiles and a partial one
    q5 = torch.randn(5, H, CFG.kv_lora_rank + CFG.qk_rope_head_dim, generator=G)
    ref = mla.attend_latent(q5[None], kv, wide[None])[0]                 # row 0, gathered
    for isa in ISAS:                                                     # every vector width
        torch.testing.assert_close(real(q5, wide, kv.pages(0, 0)[0], mla.scale, CFG.kv_lora_rank, isa), ref,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sparse_prefill: unsupported"):  # a key past its table
        real(torch.randn(1, H, CFG.kv_lora_rank + CFG.qk_rope_head_dim), torch.tensor([[pages.table.numel() * 64]]), pages, 0.1,
             CFG.kv_lora_rank)


def test_served_prefill_takes_dense_masked_below_the_threshold(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    model.init_weights(std=0.05)
    x = torch.randint(0, 1024, (1, 40))
    with torch.no_grad():
        masked = model(x, attention=Attention.TOPK_MASKED)
        gathered = model(x, attention=Attention.TOPK_GATHERED)
        taken = []
        real = attention.MLA.mha
        monkeypatch.setattr(attention.MLA, "mha", lambda *a, **k: taken.append(1) or real(*a, **k))
        auto = model(x)
        assert taken                                                     # 40 keys <= DENSE_MAX_KEYS
        taken.clear()
        monkeypatch.setattr(attention, "DENSE_MAX_KEYS", 20)
        sparse_auto = model(x)
        assert not taken
    torch.testing.assert_close(auto, masked, rtol=0, atol=0)
    torch.testing.assert_close(sparse_auto, gathered, rtol=0, atol=0)
    assert (masked - gathered).abs().max() < 1e-4
