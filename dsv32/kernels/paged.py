"""DSA over the paged cache without host syncs: cache writes, indexer scores + top-k, and sparse
absorbed MLA over the selected latent rows, each reading the PagedCache pools through the block
tables (static shapes: `S` keys per row, a host-known bound such as the graph bucket's context).

Backends: "torch" (gather + einsum, the same math as `Indexer.scores`/`MLA.mqa_sparse`) and
"triton" (`triton/indexer.py`, `triton/sparse_mla.py`: FP8 rows dequantised in registers).
References: `Indexer.select` over `PagedKV.index_keys` and `MLA.mqa_sparse` over `PagedKV`.
"""
from __future__ import annotations

import torch

from . import check_backend

SCORE_BLOCK = 1 << 24     # elements of one [queries x heads x keys] block in the torch backend


def key_slots(tables: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Key positions pos [B, ...] (>= 0) -> flat cache slots [B, ...] through tables [B, nb]."""
    B = pos.shape[0]
    blocks = torch.gather(tables, 1, (pos // block_size).reshape(B, -1)).view(pos.shape)
    return blocks * block_size + pos % block_size


def write(cache, layer: int, slots: torch.Tensor, latent: torch.Tensor, index_k: torch.Tensor) -> None:
    """Write new tokens: slots [B, T] (-1 = padding), latent [B, T, C+R], index_k [B, T, Di].
    Padding rows rewrite the first real row's entry with the same values (no boolean indexing,
    so no sync; duplicate writes of one value are deterministic)."""
    flat = slots.reshape(-1)
    valid = flat >= 0
    first = valid.to(torch.int8).argmax()                                # a real row (there is one)
    src = torch.where(valid, torch.arange(flat.numel(), device=flat.device), first)
    cache.write(layer, flat[src], latent.reshape(-1, latent.shape[-1])[src],
                index_k.reshape(-1, index_k.shape[-1])[src])


def indexer_scores(q: torch.Tensor, w: torch.Tensor, cache, layer: int, tables: torch.Tensor,
                   positions: torch.Tensor, S: int, backend: str = "torch") -> torch.Tensor:
    """q [B, T, H, Di], w [B, T, H] (fp32) -> index scores [B, T, S] fp32 over keys 0..S-1,
    -inf for keys after each query's position (`Indexer.scores` + the causal mask)."""
    B, T, H, _ = q.shape
    if check_backend(backend) == "triton":
        from .triton.indexer import indexer_scores as kernel
        return kernel(q, w, cache, layer, tables, positions, S)
    j = torch.arange(S, device=q.device)
    keys = cache.read_index(layer, key_slots(tables, j.expand(B, S), cache.block_size))   # [B, S, Di]
    out = torch.empty(B, T, S, device=q.device)
    step = max(1, SCORE_BLOCK // (H * S))
    for s in range(0, T, step):
        c = slice(s, min(T, s + step))
        sc = torch.einsum("bthd,bsd->bths", q[:, c].float(), keys.float()).relu_()     # [B, t, H, S]
        sc = torch.einsum("bths,bth->bts", sc, w[:, c])
        out[:, c] = sc.masked_fill(j.view(1, 1, S) > positions[:, c].unsqueeze(-1), float("-inf"))
    return out


def topk_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Scores [B, T, S] (-inf = not visible) -> the top-k key ids [B, T, min(k, S)], -1 where
    fewer keys are visible (`Indexer.top`)."""
    val, idx = scores.topk(min(k, scores.shape[-1]), dim=-1)
    return idx.masked_fill(val == float("-inf"), -1)


def sparse_mla(q: torch.Tensor, idx: torch.Tensor, cache, layer: int, tables: torch.Tensor,
               scale: float, backend: str = "torch") -> torch.Tensor:
    """Absorbed MQA over the selected latent rows: q [B, T, H, C+R] (q_nope W_uk | q_pe), idx
    [B, T, K] key ids (-1 = empty) -> o_lat [B, T, H, C] in q's dtype (before W_uv)."""
    if check_backend(backend) == "triton":
        from .triton.sparse_mla import sparse_mla as kernel
        return kernel(q, idx, cache, layer, tables, scale)
    C = cache.kv_rank
    B, T, H, _ = q.shape
    out = q.new_empty(B, T, H, C)
    step = max(1, SCORE_BLOCK // (H * idx.shape[-1] + idx.shape[-1] * q.shape[-1]))
    for s in range(0, T, step):
        c = slice(s, min(T, s + step))
        sel = idx[:, c]
        rows = cache.read_latent(layer, key_slots(tables, sel.clamp(min=0), cache.block_size)).to(q.dtype)
        sc = torch.einsum("bthd,btkd->bthk", q[:, c], rows).float() * scale
        p = sc.masked_fill((sel < 0).unsqueeze(2), float("-inf")).softmax(-1).to(q.dtype)
        out[:, c] = torch.einsum("bthk,btkc->bthc", p, rows[..., :C])
    return out
