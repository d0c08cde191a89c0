"""MTP speculative decoding, in one place: the drafts and their verification.

After each step the model's MTP layer drafts the token after each decoding sequence's last one
(`propose`). The scheduler counts a draft as one more token to compute (and drops it when there is
no room); the runner packs it behind the last token and asks for two rows of logits (the last
token's successor, the draft's successor). The engine samples the first row as usual; `verify`
then keeps the draft only if the sampled token equals it, and the engine samples the second row
too, so every token is still drawn from the main model's distribution. A rejected draft's key is
dropped from the cache (it belongs to another token).

`Speculator` is speculation off: no drafts, nothing to verify; `MTPSpeculator` drafts.
"""
from __future__ import annotations

from .batch import StepInput, pack
from .executor import Executor
from .sequence import Sequence

Group = list[tuple[Sequence, int]]     # (sequence, new tokens) computed by one forward


class Speculator:
    """No speculative decoding: the engine's default when num_speculative_tokens is 0."""

    def draft_of(self, seq: Sequence) -> int | None:
        """The token drafted after `seq`'s last one, to verify in the next forward (None: none)."""
        return None

    def drop(self, seq: Sequence) -> None:
        """Forget `seq`'s draft (no room to verify it, preempted or finished)."""

    def computed(self, group: Group, x: StepInput) -> None:
        """The runner ran a forward of `group` over `x` (its hidden states are what MTP reads)."""

    def verify(self, seq: Sequence, token: int) -> bool:
        """`token` was sampled after `seq`'s last token: True when it was the draft (the draft's
        row of logits is then the next to sample from)."""
        return False

    def propose(self) -> None:
        """After sampling: draft the next token of every decoding sequence."""

    def metrics(self) -> dict:
        return {"spec_draft_tokens": 0, "spec_accepted_tokens": 0}

    def reset_counters(self) -> None:
        """Start the metrics' counts again from zero."""


class MTPSpeculator(Speculator):
    """The model's MTP layer drafts one token per decoding sequence after every step."""

    def __init__(self, executor: Executor, block_size: int):
        self.executor, self.block_size = executor, block_size
        self.drafts: dict[int, int] = {}                  # seq_id -> drafted token
        self.forwards: list[tuple[Group, StepInput]] = []  # forwards since the last proposal
        self.reset_counters()

    def draft_of(self, seq: Sequence) -> int | None:
        return self.drafts.get(seq.seq_id)

    def drop(self, seq: Sequence) -> None:
        self.drafts.pop(seq.seq_id, None)

    def computed(self, group: Group, x: StepInput) -> None:
        self.forwards.append((group, x))

    def verify(self, seq: Sequence, token: int) -> bool:
        draft = self.drafts.pop(seq.seq_id, None)
        if draft is None or seq.is_finished:
            return False
        self.num_drafts += 1
        if token == draft:                  # its logits are already computed
            self.num_accepted += 1
            return True
        seq.num_computed_tokens -= 1        # its key in the cache belongs to another token
        return False

    def propose(self) -> None:
        """Run the MTP layer over the positions the last forwards computed and kept (t <
        num_computed_tokens, token t+1 known), writing its cache, and draft the MTP argmax for the
        token after the last of every decoding sequence."""
        plan, owners = [], []
        for g, (group, x) in enumerate(self.forwards):
            entry = self._plan(g, group, x)
            if entry is not None:
                plan.append(entry[0])
                owners.append(entry[1])
        for seqs, tokens in zip(owners, self.executor.mtp(plan, len(self.forwards))):
            for seq, tok in zip(seqs, tokens):
                self.drafts[seq.seq_id] = tok
        self.forwards = []

    def _plan(self, g: int, group: Group, x: StepInput) -> tuple[tuple, list[Sequence]] | None:
        """Forward g's entry of the MTP plan (token t+1 at position t) and the sequences that get
        a draft; None when none of its rows has a position to run."""
        rows = []
        for b, (seq, _) in enumerate(group):
            start, end = int(x.pos[b, 0]), min(seq.num_computed_tokens, len(seq) - 1)
            if not seq.is_finished and end > start:
                rows.append((b, seq, start, end))
        if not rows:
            return None
        y = pack([(seq, s, seq.token_ids[s + 1: e + 1]) for _, seq, s, e in rows], self.block_size)
        want, seqs = [], []
        for i, (_, seq, s, e) in enumerate(rows):
            p = seq.params
            last_one = p.max_tokens is not None and seq.num_output_tokens + 1 >= p.max_tokens
            if e == len(seq) - 1 and not last_one:                           # decoding
                want.append((i, e - 1 - s))
                seqs.append(seq)
        return (g, y, [(b, e - s) for b, _, s, e in rows], want), seqs

    def metrics(self) -> dict:
        return {"spec_draft_tokens": self.num_drafts, "spec_accepted_tokens": self.num_accepted}

    def reset_counters(self) -> None:
        self.num_drafts = self.num_accepted = 0


def speculator_for(speculative: bool, executor: Executor, block_size: int) -> Speculator:
    return MTPSpeculator(executor, block_size) if speculative else Speculator()

