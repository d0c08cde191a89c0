"""A typed extension point of the engine: an observer, passed at construction, that sees every
step. GRPO's rollout recorder is one (Keep Routing: the experts each computed token went to, via
the model's `Hooks`; Keep Sampling Mask: each sampled token's kept set and log-prob)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dsv32.model.hooks import Hooks

from .sequence import Sequence

if TYPE_CHECKING:
    from .sampler import SamplerOutput

ForwardRow = tuple[Sequence, int, int]   # (sequence, position of its first new token, new tokens)


class StepObserver:
    """Sees each forward and each sampling of an engine; this base sees nothing and costs nothing."""

    wants_kept = False      # True: the sampler returns every row's kept-token mask (SamplerOutput.kept)

    def forward(self, rows: list[ForwardRow]) -> Hooks | None:
        """A forward is about to compute `rows` (row b of the model's batch is rows[b]); returns
        the model hooks to run it with (None: none)."""
        return None

    def sampled(self, seqs: list[Sequence], logits: torch.Tensor, out: SamplerOutput) -> None:
        """One token was sampled for each of `seqs` from its row of `logits` [B, V] fp32."""
