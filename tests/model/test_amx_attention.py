"""The sparse attention with many heads over a bf16 cache (model/cpu/amx_attention.cpp on AMX tiles
where the CPU has them, sparse_attention.cpp's vector code beside it) against float64 over the rows
as the pool holds them: one decode row (native.decode_attention) and a prefill's queries
(native.sparse_prefill), with head counts off the tiles' 16 and 32, partial chunks and empty slots."""
import pytest
import torch

from dsv32.model.cpu import native
from dsv32.model.cpu.pages import Pages

from .test_native import AMX_INDEX

G = torch.Generator().manual_seed(0)
C, R, Di, BLOCK = 512, 64, 128, 64
SCALE = 0.07
VECTOR = [512] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [None]


def bf16_pages(S: int) -> Pages:
    """bf16 pools holding S random keys (and room for more) in shuffled blocks."""
    nb = -(-S // BLOCK) + 2
    return Pages(torch.randn(nb * BLOCK, C + R, generator=G).to(torch.bfloat16),
                 torch.randn(nb * BLOCK, Di, generator=G).to(torch.bfloat16), torch.randperm(nb, generator=G), BLOCK)


def reference(q: torch.Tensor, pages: Pages, ids: list[int]) -> torch.Tensor:
    """softmax(SCALE q . row) weighted sums of row[:C] over the key positions ids, in float64 -> [H, C]."""
    if not ids:
        return torch.zeros(q.shape[0], C, dtype=torch.float64)
    slots = [int(pages.table[s // BLOCK]) * BLOCK + s % BLOCK for s in ids]
    rows = pages.latent[slots].double()
    return torch.softmax(SCALE * q.double() @ rows.T, -1) @ rows[:, :C]


def takes_tiles(H: int, K: int) -> bool:
    """amx_attention.cpp's amx_attends for a bf16 pool."""
    return bool(AMX_INDEX) and H >= 16 and K >= 64 and H * K >= 2048


@pytest.mark.parametrize("H,S,topk", [(16, 300, 300), (20, 130, 256), (48, 64, 64), (128, 2048, 2048),
                                      (32, 40, 64), (32, 700, 256)])
def test_decode_attention_with_many_heads_over_a_bf16_cache(H, S, topk):
    """One decode row: every selected row (S <= topk; the last one the row it writes) or the
    indexer's top-k (S > topk), on tiles where they are taken (a 44-row last chunk at S 300; 20 and
    48 heads pad a tile; (32, 40): too few rows, the vector code) and by the vector code."""
    pages = bf16_pages(S)
    latent, index_k = torch.randn(C + R, generator=G), torch.randn(Di, generator=G)
    q, iq, iw = torch.randn(H, C + R, generator=G), torch.randn(16, Di, generator=G), torch.randn(16, generator=G)
    outs = {isa: native.decode_attention(latent, index_k, q, iq, iw, pages, S, topk, SCALE, C, isa)
            for isa in VECTOR + AMX_INDEX}
    ids = list(range(S))
    if S > topk:                                        # the indexer's choice, from its float64 scores
        slots = [int(pages.table[s // BLOCK]) * BLOCK + s % BLOCK for s in ids]
        scores = (iw.double()[:, None] * (iq.double() @ pages.index[slots].double().T).relu()).sum(0)
        ids = sorted(scores.topk(topk).indices.tolist())
    ref = reference(q, pages, ids)
    for isa, out in outs.items():
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"isa {isa}: {m}")
    if AMX_INDEX:                                       # the tiles ran where they are taken (other sums)
        assert torch.equal(outs[AMX_INDEX[0]], outs[VECTOR[0]]) != takes_tiles(H, min(S, topk))


@pytest.mark.parametrize("H", [16, 20, 48])
def test_sparse_prefill_with_many_heads_over_a_bf16_cache(H):
    """A prefill's queries, each over its own K = 300 slots: all empty (zeros), 70 keys among empty
    slots, 129 keys (a chunk and one row), all 300; on tiles where the CPU has them and by the vector
    code."""
    S, K = 900, 300
    pages = bf16_pages(S)
    ids = torch.full((4, K), -1, dtype=torch.int64)
    ids[1, torch.randperm(K, generator=G)[:70]] = torch.randperm(S, generator=G)[:70]
    ids[2, 100:229] = torch.randperm(S, generator=G)[:129]
    ids[3] = torch.randperm(S, generator=G)[:K]
    q = torch.randn(4, H, C + R, generator=G)
    refs = [reference(q[i], pages, [s for s in ids[i].tolist() if s >= 0]) for i in range(4)]
    outs = {isa: native.sparse_prefill(q, ids, pages, SCALE, C, isa) for isa in VECTOR + AMX_INDEX}
    for isa, out in outs.items():
        assert bool((out[0] == 0).all()), isa
        for i in range(1, 4):
            torch.testing.assert_close(out[i].double(), refs[i], rtol=1e-5, atol=1e-5, msg=lambda m: f"isa {isa}: {m}")
    if AMX_INDEX:
        assert not torch.equal(outs[AMX_INDEX[0]][3], outs[VECTOR[0]][3])
