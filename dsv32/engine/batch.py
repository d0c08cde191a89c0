"""What one forward computes: rows of (sequence, first position, tokens) packed into padded CPU
tensors over the paged cache (what tensor-parallel workers receive)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .sequence import Sequence


class StepInput(NamedTuple):
    """Everything a forward needs, as CPU tensors."""

    ids: torch.Tensor       # [B, T] token ids (padded)
    pos: torch.Tensor       # [B, T] positions
    slots: torch.Tensor     # [B, T] flat cache slot per new token, -1 for padding
    ctx: torch.Tensor       # [B] keys per row after this forward
    tables: torch.Tensor    # [B, nb] block tables
    last: torch.Tensor      # [B] index of each row's last new token
    every: bool = False     # logits of every new token [B, T, V], not only the last (prompt
                            # logprobs, MTP drafts being verified)


def pack(rows: list[tuple[Sequence, int, list[int]]], block_size: int) -> StepInput:
    """Pad rows of (sequence, first position, tokens) to [B, T]: token ids, positions, cache slots,
    block tables, lengths."""
    return pack_tables([(seq.block_table, start, toks) for seq, start, toks in rows], block_size)


def pack_tables(rows: list[tuple[list[int], int, list[int]]], block_size: int) -> StepInput:
    """`pack` over rows of (block table, first position, tokens): for callers without Sequences
    (kernel tests, GPU benchmarks)."""
    B, T = len(rows), max(len(toks) for _, _, toks in rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    slots = torch.full((B, T), -1, dtype=torch.long)
    ctx = torch.zeros(B, dtype=torch.long)
    tables = torch.zeros(B, max(len(table) for table, _, _ in rows), dtype=torch.long)
    last = torch.zeros(B, dtype=torch.long)
    for b, (block_table, start, toks) in enumerate(rows):
        n = len(toks)
        p = torch.arange(start, start + n)
        ids[b, :n] = torch.tensor(toks)
        pos[b, :n] = p
        pos[b, n:] = start + n - 1                 # padding repeats the last position
        table = torch.tensor(block_table, dtype=torch.long)
        tables[b, : len(table)] = table
        slots[b, :n] = table[p // block_size] * block_size + p % block_size
        ctx[b] = start + n
        last[b] = n - 1
    return StepInput(ids, pos, slots, ctx, tables, last)
