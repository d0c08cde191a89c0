"""Attention-side fast paths against their references: indexer scoring over key runs (views of a
paged cache, fragmented block tables, FP8 caches) and the SERVED choice of dense-masked attention."""
import pytest
import torch

from dsv32.engine.cache import MIN_RUN_BLOCKS, PagedCache, PagedKV
from dsv32.model import attention
from dsv32.model.attention import Attention, Indexer
from dsv32.model.init_tiny import tiny_config
from dsv32.model.cpu import indexer as kindexer
from dsv32.model.cpu.indexer import index_scores, runs_of
from dsv32.model.transformer import Transformer

G = torch.Generator().manual_seed(0)
CFG = tiny_config(topk=16, index_heads=4, index_dim=128, kv_lora=128, vocab=1024)


def indexer():
    return Indexer(CFG).eval()


def query(B, T):
    H, D = CFG.index_n_heads, CFG.index_head_dim
    return torch.randn(B, T, H, D, generator=G), torch.randn(B, T, H, generator=G)


def test_blocked_scores_equal_reference_scores(monkeypatch):
    monkeypatch.setattr(kindexer, "SCORE_BYTES", 4 * 5 * 4 * 512)       # blocks of 512 keys
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


def paged(fp8: bool, tables: list[list[int]], lens: list[int], T: int):
    """A paged cache with random keys in every slot and a PagedKV over it, `T` new tokens per row."""
    cache = PagedCache(1, 40, CFG.kv_lora_rank, CFG.qk_rope_head_dim, CFG.index_head_dim, fp8=fp8)
    slots = torch.arange(40 * 64)
    cache.write(0, slots, torch.randn(len(slots), CFG.kv_lora_rank + CFG.qk_rope_head_dim, generator=G),
                torch.randn(len(slots), CFG.index_head_dim, generator=G))
    nb = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (nb - len(t)) for t in tables])
    ctx = torch.tensor(lens)
    pos = torch.stack([torch.arange(n - T, n) for n in lens])
    write = torch.gather(bt, 1, pos // 64) * 64 + pos % 64
    return PagedKV(cache, bt, ctx, write), pos


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("T", [1, 9])
def test_paged_runs_select_equals_gathered_reference(fp8, T):
    # row 0: long runs and short ones (gathered), row 1: one run and a shorter context
    tables = [[5, 6, 7, 8, 9, 0, 12, 3, 20, 21, 22, 23, 24, 25, 1], [30, 31, 32, 33, 34, 35]]
    kv, pos = paged(fp8, tables, [15 * 64 - 10, 6 * 64 - 1], T)
    runs = kv.index_runs(0)
    assert MIN_RUN_BLOCKS == 4 and [len(r) for r in runs] == [3, 1]      # 2 long runs + 1 gathered
    assert isinstance(runs[0][2][0], torch.Tensor)
    assert runs[1][0][1].data_ptr() == kv.cache.ik[0, 30 * 64].data_ptr() or fp8   # a view
    ix = indexer()
    q, w = query(2, T)
    got = ix.select(q, w, runs, pos, None, kv.num_keys(0))
    want = ix.select_reference(q, w, kv.index_keys(0), pos)
    assert torch.equal(got, want)


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
