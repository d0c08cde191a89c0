"""Model runner: turns scheduled (sequence, new tokens) pairs into padded forwards over the paged
cache and returns the next-token logits of every sequence that reached its end."""
from __future__ import annotations

from typing import NamedTuple

import torch

from dsv32.model.transformer import Transformer

from .cache import PagedCache, PagedKV
from .sampler import token_logprobs
from .sequence import Sequence


class StepInput(NamedTuple):
    """Everything a forward needs, as CPU tensors (what tensor-parallel workers receive)."""

    ids: torch.Tensor       # [B, T] token ids (padded)
    pos: torch.Tensor       # [B, T] positions
    slots: torch.Tensor     # [B, T] flat cache slot per new token, -1 for padding
    ctx: torch.Tensor       # [B] keys per row after this forward
    tables: torch.Tensor    # [B, nb] block tables
    last: torch.Tensor      # [B] index of each row's last new token
    every: bool = False     # logits of every new token [B, T, V], not only the last (prompt logprobs)


class ModelRunner:
    """Runs decodes together in one ragged-context forward and each prefill chunk on its own."""

    def __init__(self, model: Transformer, cache: PagedCache):
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        self.bs = cache.block_size
        self.recorder = None   # optional: told which (seq, start, n) tokens each forward computes

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> dict[int, torch.Tensor]:
        """Compute `n` new tokens for each (seq, n); returns {seq_id: logits [V] fp32} for the
        sequences whose tokens are now all computed (they sample a next token)."""
        alone = [s.wants_prompt_logprobs or n > 1 for s, n in batch]
        decodes = [sn for sn, a in zip(batch, alone) if not a]
        groups = [decodes] if decodes else []
        groups += [[sn] for sn, a in zip(batch, alone) if a]
        out: dict[int, torch.Tensor] = {}
        for group in groups:
            logits = self._forward(group)
            for (seq, n), row in zip(group, logits):
                seq.num_computed_tokens += n
                if row is not None:
                    out[seq.seq_id] = row
        return out

    def _forward(self, group: list[tuple[Sequence, int]]) -> list[torch.Tensor | None]:
        if self.recorder is not None:   # e.g. GRPO Keep Routing: which tokens this forward's rows are
            self.recorder.begin_forward([(seq, seq.num_computed_tokens, n) for seq, n in group])
        x = self.prepare(group)
        logits = self.compute(x)
        if x.every:                                   # one prefilling sequence: [1, n, V]
            seq, n = group[0]
            self._prompt_logprobs(seq, logits[0, :n])
            logits = logits[:, n - 1]
        return [logits[b] if seq.num_computed_tokens + n >= len(seq) else None
                for b, (seq, n) in enumerate(group)]

    @staticmethod
    def _prompt_logprobs(seq: Sequence, logits: torch.Tensor) -> None:
        """Record the logprobs of the prompt tokens that the chunk's logits [n, V] predict (a
        recomputation after preemption finds them recorded already)."""
        start, have = seq.num_computed_tokens, len(seq.prompt_logprobs)
        assert have > start, "prompt logprobs need every earlier prompt token computed"
        targets = range(max(start + 1, have), min(start + logits.shape[0] + 1, seq.num_prompt_tokens))
        if targets:
            rows = logits[targets.start - 1 - start: targets.stop - 1 - start].float().log_softmax(-1)
            k = seq.params.prompt_logprobs
            seq.prompt_logprobs += token_logprobs(rows, [seq.token_ids[t] for t in targets], [k] * len(targets))

    def prepare(self, group: list[tuple[Sequence, int]]) -> StepInput:
        """Pad a group to [B, T]: token ids, positions, cache slots, block tables, lengths."""
        B = len(group)
        T = max(n for _, n in group)
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        slots = torch.full((B, T), -1, dtype=torch.long)
        ctx = torch.zeros(B, dtype=torch.long)
        nb = max(len(s.block_table) for s, _ in group)
        tables = torch.zeros(B, nb, dtype=torch.long)
        last = torch.zeros(B, dtype=torch.long)
        for b, (seq, n) in enumerate(group):
            start = seq.num_computed_tokens
            p = torch.arange(start, start + n)
            ids[b, :n] = torch.tensor(seq.token_ids[start:start + n])
            pos[b, :n] = p
            pos[b, n:] = start + n - 1                 # padding repeats the last position
            table = torch.tensor(seq.block_table, dtype=torch.long)
            tables[b, : len(table)] = table
            slots[b, :n] = table[p // self.bs] * self.bs + p % self.bs
            ctx[b] = start + n
            last[b] = n - 1
        every = B == 1 and group[0][0].wants_prompt_logprobs
        return StepInput(ids, pos, slots, ctx, tables, last, every)

    def compute(self, x: StepInput) -> torch.Tensor:
        """One forward over the paged cache -> logits [B, V] of each row's last new token
        ([B, T, V] of every new token when `x.every`)."""
        dev = self.device
        kv = PagedKV(self.cache, x.tables.to(dev), x.ctx.to(dev), x.slots.to(dev))
        h = self.model.hidden(x.ids.to(dev), x.pos.to(dev), kv)                       # [B, T, D]
        if x.every:
            return self.model.logits(h)
        h_last = h[torch.arange(h.shape[0], device=dev), x.last.to(dev)]              # [B, D]
        return self.model.logits(h_last)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.cache.copy_blocks(pairs)
