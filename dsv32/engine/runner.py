"""Model runner: turns scheduled (sequence, new tokens) pairs into padded forwards on the executor
and returns the next-token logits of every sequence that reached its end.

Decodes run together in one ragged-context forward, each prefill chunk on its own. A sequence with
an MTP draft (speculative.py) computes its last token and the draft together and gets two rows of
logits back: the last token's successor and the draft's."""
from __future__ import annotations

import torch

from .batch import StepInput, pack
from .executor import Executor
from .observer import StepObserver
from .sampler import token_logprobs
from .sequence import Sequence
from .speculative import Speculator


class ModelRunner:
    """Runs a scheduled batch as forwards (drafts from the speculator, rows told to the observer)."""

    def __init__(self, executor: Executor, speculator: Speculator, observer: StepObserver):
        self.executor, self.speculator, self.observer = executor, speculator, observer
        self.bs = executor.cache.block_size

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> dict[int, torch.Tensor]:
        """Compute `n` new tokens for each (seq, n) (a draft counts as one); returns {seq_id:
        logits [m, V] fp32} for the sequences whose tokens are now all computed: m = 2 for a
        sequence with a draft (successor of its last token, successor of the draft), else 1."""
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
        hooks = self.observer.forward([(seq, seq.num_computed_tokens, n) for seq, n in group])
        x = self.prepare(group)
        logits = self.executor.compute(x, hooks)
        self.speculator.computed(group, x)
        if not x.every:
            logits = logits[:, None]                                      # [B, 1, V]
        elif group[0][0].wants_prompt_logprobs:                           # one prefilling sequence
            self._prompt_logprobs(group[0][0], logits[0, : group[0][1]])
        out = []
        for b, (seq, n) in enumerate(group):
            d = int(self.speculator.draft_of(seq) is not None)
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
        rows, drafted = [], False
        for seq, n in group:
            start = seq.num_computed_tokens
            toks = seq.token_ids[start:start + n]
            draft = self.speculator.draft_of(seq)
            drafted |= draft is not None
            rows.append((seq, start, toks + [draft] * (n - len(toks))))
        every = (len(group) == 1 and group[0][0].wants_prompt_logprobs) or drafted
        return pack(rows, self.bs)._replace(every=every)
