"""Model runner: turns scheduled (sequence, new tokens) pairs into padded forwards over the paged
cache and returns the next-token logits of every sequence that reached its end.

MTP speculation: a decoding sequence may carry a `draft` for the token after its last one. The
forward then computes both tokens and returns two rows of logits (for the last token's successor
and for the draft's); the engine samples the first and, only when it equals the draft, the
second. `draft()` afterwards plans an MTP forward over the positions just computed (filling its
cache) and `mtp_draft(plan)` runs it and proposes the next drafts (tensor-parallel workers run the
same plan)."""
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
    every: bool = False     # logits of every new token [B, T, V], not only the last (prompt
                            # logprobs, MTP drafts being verified)


class ModelRunner:
    """Runs decodes together in one ragged-context forward and each prefill chunk on its own."""

    def __init__(self, model: Transformer, cache: PagedCache):
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        self.bs = cache.block_size
        self.recorder = None   # optional: told which (seq, start, n) tokens each forward computes
        self.speculate = False  # keep each forward's hidden states for the MTP drafts
        self._computed: list[tuple[list[tuple[Sequence, int]], StepInput]] = []
        self.hiddens: list[torch.Tensor] = []   # [B, T, D] of each forward since the last draft

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> dict[int, torch.Tensor]:
        """Compute `n` new tokens for each (seq, n) (a draft counts as one); returns {seq_id:
        logits [m, V] fp32} for the sequences whose tokens are now all computed: m = 2 for a
        sequence with a draft (successor of its last token, successor of the draft), else 1."""
        self._computed, self.hiddens = [], []
        alone = [s.wants_prompt_logprobs or len(s) - s.num_computed_tokens > 1 for s, _ in batch]
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
        if self.speculate:
            self._computed.append((group, x))
        if not x.every:
            logits = logits[:, None]                                      # [B, 1, V]
        elif group[0][0].wants_prompt_logprobs:                           # one prefilling sequence
            self._prompt_logprobs(group[0][0], logits[0, : group[0][1]])
        out = []
        for b, (seq, n) in enumerate(group):
            d = int(seq.draft is not None)
            if seq.num_computed_tokens + n < len(seq) + d:
                out.append(None)                                          # a prefill chunk short of the end
            else:
                out.append(logits[b, n - 1 - d: n] if x.every else logits[b])   # [1 + d, V]
        return out

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
        """The forward of a group: each sequence's `n` tokens from `num_computed_tokens` on (a
        draft rides last)."""
        rows = []
        for seq, n in group:
            start = seq.num_computed_tokens
            toks = seq.token_ids[start:start + n]
            rows.append((seq, start, toks + [seq.draft] * (n - len(toks))))
        every = (len(group) == 1 and group[0][0].wants_prompt_logprobs) or any(s.draft is not None for s, _ in group)
        return self._pack(rows)._replace(every=every)

    def _pack(self, rows: list[tuple[Sequence, int, list[int]]]) -> StepInput:
        """Pad rows of (sequence, first position, tokens) to [B, T]: token ids, positions, cache
        slots, block tables, lengths."""
        B, T = len(rows), max(len(toks) for _, _, toks in rows)
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        slots = torch.full((B, T), -1, dtype=torch.long)
        ctx = torch.zeros(B, dtype=torch.long)
        tables = torch.zeros(B, max(len(seq.block_table) for seq, _, _ in rows), dtype=torch.long)
        last = torch.zeros(B, dtype=torch.long)
        for b, (seq, start, toks) in enumerate(rows):
            n = len(toks)
            p = torch.arange(start, start + n)
            ids[b, :n] = torch.tensor(toks)
            pos[b, :n] = p
            pos[b, n:] = start + n - 1                 # padding repeats the last position
            table = torch.tensor(seq.block_table, dtype=torch.long)
            tables[b, : len(table)] = table
            slots[b, :n] = table[p // self.bs] * self.bs + p % self.bs
            ctx[b] = start + n
            last[b] = n - 1
        return StepInput(ids, pos, slots, ctx, tables, last)

    def compute(self, x: StepInput) -> torch.Tensor:
        """One forward over the paged cache -> logits [B, V] of each row's last new token
        ([B, T, V] of every new token when `x.every`)."""
        dev = self.device
        kv = PagedKV(self.cache, x.tables.to(dev), x.ctx.to(dev), x.slots.to(dev))
        h = self.model.hidden(x.ids.to(dev), x.pos.to(dev), kv)                       # [B, T, D]
        if self.speculate:
            self.hiddens.append(h)
        if x.every:
            return self.model.logits(h)
        h_last = h[torch.arange(h.shape[0], device=dev), x.last.to(dev)]              # [B, D]
        return self.model.logits(h_last)

    @torch.inference_mode()
    def draft(self) -> None:
        """After the engine has sampled: run the MTP layer over the positions the last `run`
        computed and kept (t < num_computed_tokens, token t+1 known), writing its cache, and give
        every decoding sequence a draft: the MTP argmax for the token after its last."""
        plan, owners = [], []
        for g, (group, x) in enumerate(self._computed):
            rows = []
            for b, (seq, _) in enumerate(group):
                start, end = int(x.pos[b, 0]), min(seq.num_computed_tokens, len(seq) - 1)
                if not seq.is_finished and end > start:
                    rows.append((b, seq, start, end))
            if not rows:
                continue
            y = self._pack([(seq, s, seq.token_ids[s + 1: e + 1]) for _, seq, s, e in rows])  # token t+1 at t
            want, seqs = [], []
            for i, (_, seq, s, e) in enumerate(rows):
                p = seq.params
                last_one = p.max_tokens is not None and seq.num_output_tokens + 1 >= p.max_tokens
                if e == len(seq) - 1 and not last_one:                           # decoding
                    want.append((i, e - 1 - s))
                    seqs.append(seq)
            plan.append((g, y, [(b, e - s) for b, _, s, e in rows], want))
            owners.append(seqs)
        for seqs, tokens in zip(owners, self.mtp_draft(plan, len(self._computed))):
            for seq, tok in zip(seqs, tokens):
                seq.draft = tok
        self._computed = []

    def mtp_draft(self, plan: list[tuple[int, StepInput, list[tuple[int, int]], list[tuple[int, int]]]],
                  forwards: int) -> list[list[int]]:
        """Run the MTP layer for each (forward g of the last `forwards`, packed rows y, (row of g,
        length) per row of y, (row, position) to draft at); returns the drafted tokens of each
        entry. Forgets the hidden states kept so far."""
        out = []
        dev = self.device
        first = len(self.hiddens) - forwards
        for g, y, picks, want in plan:
            h = self.hiddens[first + g]
            hs = h.new_zeros(*y.ids.shape, h.shape[-1])
            for i, (b, n) in enumerate(picks):
                hs[i, :n] = h[b, :n]
            kv = PagedKV(self.cache, y.tables.to(dev), y.ctx.to(dev), y.slots.to(dev))
            pos = y.pos.to(dev)
            cos, sin = self.model.rotary(pos)
            hidden = self.model.mtp(hs, y.ids.to(dev), pos, cos, sin, kv, return_hidden=True)  # [B, T, D]
            if want:
                rows, cols = zip(*want)
                out.append(self.model.mtp.shared_head(hidden[list(rows), list(cols)]).argmax(-1).tolist())
            else:
                out.append([])
        self.hiddens = []
        return out

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.cache.copy_blocks(pairs)
