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
    (kernel tests, GPU benchmarks). Built as Python lists, one tensor per field (a decode step's
    few rows cost ~10 us, not ~30 small tensor ops per row)."""
    T = max(len(toks) for _, _, toks in rows)
    nb = max(len(table) for table, _, _ in rows)
    ids, pos, slots, ctx, tables, last = [], [], [], [], [], []
    for table, start, toks in rows:
        n, pad = len(toks), T - len(toks)
        p = list(range(start, start + n))
        ids.append(list(toks) + [0] * pad)
        pos.append(p + [start + n - 1] * pad)                # padding repeats the last position
        slots.append([table[q // block_size] * block_size + q % block_size for q in p] + [-1] * pad)
        ctx.append(start + n)
        tables.append(list(table) + [0] * (nb - len(table)))
        last.append(n - 1)
    t = lambda v: torch.tensor(v, dtype=torch.long)
    return StepInput(t(ids), t(pos), t(slots), t(ctx), t(tables), t(last))
