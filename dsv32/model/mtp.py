"""Multi-token prediction: one extra decoder layer that predicts token t+2 from h_t and token t+1."""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .block import Block
from .config import ModelConfig
from .hooks import Hooks
from .layers import Linear, RMSNorm, VocabParallelEmbedding
from dsv32.parallel.context import SINGLE, ParallelContext


def vocab_parallel_head(cfg: ModelConfig, dtype, pc: ParallelContext) -> Linear:
    """An LM head whose output rows (the vocabulary) are split across tensor-parallel ranks."""
    v0, v1 = pc.split(cfg.vocab_size, "vocab_size")
    return Linear(cfg.hidden_size, v1 - v0, dtype=dtype, shard=(0, v0, v1) if pc.enabled else None)


class SharedHead(nn.Module):
    """`shared_head.{norm, head}`: the MTP layer's own final norm and LM head."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None = None, pc: ParallelContext = SINGLE):
        super().__init__()
        self.pc = pc
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.head = vocab_parallel_head(cfg, dtype, pc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> fp32 logits [..., vocab] (gathered over vocab-parallel ranks)."""
        return self.pc.all_gather_last(self.head(self.norm(x)).float())


class MTPLayer(Block):
    """Layer `num_hidden_layers`: eh_proj(concat[enorm(embed(t+1)), hnorm(h_t)]) -> block -> head."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype | None = None,
                 fp8_sim: bool = False, pc: ParallelContext = SINGLE):
        super().__init__(cfg, layer_idx, dtype, fp8_sim, pc)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, pc)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, dtype=dtype)
        self.shared_head = SharedHead(cfg, dtype, pc)

    def combine(self, h: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The block's input [B, T, D] from the main hidden h_t [B, T, D] and token t+1 [B, T]."""
        e = self.embed_tokens(next_ids)
        e = e.masked_fill((positions == 0).unsqueeze(-1), 0.0)  # as engines serving the real weights do
        return self.eh_proj(torch.cat((self.enorm(e), self.hnorm(h)), dim=-1))

    def block(self, x: torch.Tensor, positions, cos, sin, kv, attention: Attention = Attention.SERVED,
              doc: torch.Tensor | None = None, hooks: Hooks | None = None) -> torch.Tensor:
        """The decoder block over combined inputs x [B, T, D] -> [B, T, D] (before `shared_head`)."""
        return super().forward(x, positions, cos, sin, kv, attention, doc, hooks)

    def forward(self, h: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, kv, attention: Attention = Attention.SERVED,
                doc: torch.Tensor | None = None, hooks: Hooks | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """h [B, T, D] main hidden at t, next_ids [B, T] token t+1 -> logits [B, T, vocab] (or,
        with `return_hidden`, the block's output [B, T, D] before `shared_head`)."""
        x = self.combine(h, next_ids, positions)
        x = self.block(x, positions, cos, sin, kv, attention, doc, hooks)
        return x if return_hidden else self.shared_head(x)
