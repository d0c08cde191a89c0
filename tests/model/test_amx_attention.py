"""The sparse attention with many heads over a bf16 or FP8 cache (model/cpu/amx_attention.cpp on AMX
tiles where the CPU has them, sparse_attention.cpp's vector code beside it) against float64 over the
rows as the pool holds them: one decode row (native.decode_attention) and a prefill's queries
(native.sparse_prefill), with head counts off the tiles' 16 and 32, partial chunks and empty slots."""
import pytest
import torch

from dsv32.model.cpu import native
from dsv32.model.cpu.pages import Pages
from dsv32.model.fp8 import dequantize_groups, quantize_groups

from .test_native import AMX_INDEX

G = torch.Generator().manual_seed(0)
C, R, Di, BLOCK = 512, 64, 128, 64
SCALE = 0.07
VECTOR = [512] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [None]


def cache_pages(S: int, pool: str) -> Pages:
    """bf16 or FP8 pools (engine/cache.py's layouts) holding S random keys (and room for more) in
    shuffled blocks."""
    nb = -(-S // BLOCK) + 2
    latent, index = torch.randn(nb * BLOCK, C + R, generator=G) * 3, torch.randn(nb * BLOCK, Di, generator=G)
    table = torch.randperm(nb, generator=G)
    if pool == "bf16":
        return Pages(latent.to(torch.bfloat16), index.to(torch.bfloat16), table, BLOCK)
    (c, c_scale), (ik, ik_scale) = quantize_groups(latent[:, :C]), quantize_groups(index)
    return Pages(c, ik, table, BLOCK, c_scale, latent[:, C:].to(torch.bfloat16), ik_scale)


def stored(pages: Pages, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent and index rows at `slots` as the pools hold them, in float64."""
    if pages.latent.dtype == torch.bfloat16:
        return pages.latent[slots].double(), pages.index[slots].double()
    lat = dequantize_groups(pages.latent[slots], pages.latent_scale[slots], torch.float32)
    return (torch.cat((lat, pages.rope[slots].float()), -1).double(),
            dequantize_groups(pages.index[slots], pages.index_scale[slots], torch.float32).double())


def reference(q: torch.Tensor, pages: Pages, ids: list[int]) -> torch.Tensor:
    """softmax(SCALE q . row) weighted sums of row[:C] over the key positions ids, in float64 -> [H, C]."""
    if not ids:
        return torch.zeros(q.shape[0], C, dtype=torch.float64)
    rows = stored(pages, [int(pages.table[s // BLOCK]) * BLOCK + s % BLOCK for s in ids])[0]
    return torch.softmax(SCALE * q.double() @ rows.T, -1) @ rows[:, :C]


def row_inputs(H: int) -> tuple[torch.Tensor, ...]:
    """One decode row's new latent and index key, its absorbed queries [H, C+R] and its indexer's
    queries and weights (16 heads)."""
    latent, index_k = torch.randn(C + R, generator=G), torch.randn(Di, generator=G)
    q, iq, iw = torch.randn(H, C + R, generator=G) * 0.3, torch.randn(16, Di, generator=G), torch.randn(16, generator=G)
    return latent, index_k, q, iq, iw


def takes_tiles(H: int, K: int) -> bool:
    """amx_attention.cpp's amx_attends for these pools."""
    return bool(AMX_INDEX) and H >= 16 and K >= 64 and H * K >= 2048


@pytest.mark.parametrize("pool", ["bf16", "fp8"])
@pytest.mark.parametrize("H,S,topk", [(16, 300, 300), (20, 130, 256), (48, 64, 64), (128, 2048, 2048),
                                      (32, 40, 64), (32, 700, 256)])
def test_decode_attention_with_many_heads(H, S, topk, pool):
    """One decode row: every selected row (S <= topk; the last one the row it writes) or the
    indexer's top-k (S > topk), on tiles where they are taken (a 44-row last chunk at S 300; 20 and
    48 heads pad a tile; (32, 40): too few rows, the vector code) and by the vector code."""
    pages = cache_pages(S, pool)
    latent, index_k, q, iq, iw = row_inputs(H)
    outs = {isa: native.decode_attention(latent, index_k, q, iq, iw, pages, S, topk, SCALE, C, isa)
            for isa in VECTOR + AMX_INDEX}
    ids = list(range(S))
    if S > topk:                                        # the indexer's choice, from its float64 scores
        keys = stored(pages, [int(pages.table[s // BLOCK]) * BLOCK + s % BLOCK for s in ids])[1]
        scores = (iw.double()[:, None] * (iq.double() @ keys.T).relu()).sum(0)
        ids = sorted(scores.topk(topk).indices.tolist())
    ref = reference(q, pages, ids)
    for isa, out in outs.items():
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"isa {isa}: {m}")
    if AMX_INDEX:                                       # the tiles ran where they are taken (other sums)
        assert torch.equal(outs[AMX_INDEX[0]], outs[VECTOR[0]]) != takes_tiles(H, min(S, topk))


@pytest.mark.parametrize("pool", ["bf16", "fp8"])
@pytest.mark.parametrize("H", [16, 20, 48])
def test_sparse_prefill_with_many_heads(H, pool):
    """A prefill's queries, each over its own K = 300 slots: all empty (zeros), 70 keys among empty
    slots, 129 keys (a chunk and one row), all 300; on tiles where the CPU has them and by the vector
    code."""
    S, K = 900, 300
    pages = cache_pages(S, pool)
    ids = torch.full((4, K), -1, dtype=torch.int64)
    ids[1, torch.randperm(K, generator=G)[:70]] = torch.randperm(S, generator=G)[:70]
    ids[2, 100:229] = torch.randperm(S, generator=G)[:129]
    ids[3] = torch.randperm(S, generator=G)[:K]
    q = torch.randn(4, H, C + R, generator=G) * 0.3
    refs = [reference(q[i], pages, [s for s in ids[i].tolist() if s >= 0]) for i in range(4)]
    outs = {isa: native.sparse_prefill(q, ids, pages, SCALE, C, isa) for isa in VECTOR + AMX_INDEX}
    for isa, out in outs.items():
        assert bool((out[0] == 0).all()), isa
        for i in range(1, 4):
            torch.testing.assert_close(out[i].double(), refs[i], rtol=1e-5, atol=1e-5, msg=lambda m: f"isa {isa}: {m}")
    if AMX_INDEX:
        assert not torch.equal(outs[AMX_INDEX[0]][3], outs[VECTOR[0]][3])


def test_a_nan_in_a_selected_row_reaches_every_head():
    """A NaN in the cache (a row the model overflowed into) makes every head's output NaN, on the
    tiles as in the vector code (never a finite value that hides it)."""
    H, S = 32, 300
    pages = cache_pages(S, "bf16")
    pages.latent[int(pages.table[5 // BLOCK]) * BLOCK + 5, 7] = float("nan")
    latent, index_k, q, iq, iw = row_inputs(H)
    for isa in VECTOR + AMX_INDEX:
        out = native.decode_attention(latent, index_k, q, iq, iw, pages, S, S, SCALE, C, isa)
        assert bool(out.isnan().all()), isa


@pytest.mark.parametrize("pool", ["bf16", "fp8"])
def test_decode_attention_is_deterministic(pool):
    """The same call gives the same bits every time, though the tiles hand the row chunks to whichever
    thread comes free (each chunk's part is kept apart and the parts merged in order)."""
    H, S = 64, 2048
    pages = cache_pages(S, pool)
    latent, index_k, q, iq, iw = row_inputs(H)
    outs = {native.decode_attention(latent, index_k, q, iq, iw, pages, S, S, SCALE, C).numpy().tobytes()
            for _ in range(30)}
    assert len(outs) == 1
