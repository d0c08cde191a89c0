"""The DeepSeek-V3.2 decoder: embedding, pre-norm blocks (MLA+DSA, dense MLP or MoE), final norm,
LM head, and the MTP layer stored after the main stack (skipped by it)."""
from __future__ import annotations

from itertools import islice

import torch
from torch import nn

from . import decode
from .attention import Attention
from .block import Block
from .config import ModelConfig
from .hooks import Hooks
from .kv import FreshKV
from .layers import RMSNorm, Rotary, VocabParallelEmbedding
from .mtp import MTPLayer, vocab_parallel_head
from dsv32.parallel.context import SINGLE, ParallelContext


class Decoder(nn.Module):
    """`model.*` in the checkpoint: embed_tokens, layers[0..n-1] (+ MTP layer n), norm."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None = None, fp8_sim: bool = False,
                 pc: ParallelContext = SINGLE):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, pc)
        layers = [Block(cfg, i, dtype, fp8_sim, pc) for i in range(cfg.num_hidden_layers)]
        layers += [MTPLayer(cfg, cfg.num_hidden_layers + j, dtype, fp8_sim, pc)
                   for j in range(cfg.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


class Transformer(nn.Module):
    """DeepSeek-V3.2 causal LM: `forward(input_ids [B, T]) -> logits [B, T, vocab]`."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, fp8_sim: bool = False,
                 pc: ParallelContext = SINGLE):
        super().__init__()
        self.config, self.pc = cfg, pc
        self.n_layers = cfg.num_hidden_layers
        self.model = Decoder(cfg, dtype, fp8_sim, pc)
        self.lm_head = vocab_parallel_head(cfg, dtype, pc)
        self.rotary = Rotary(cfg)

    @torch.no_grad()
    def init_weights(self, std: float = 0.006, generator: torch.Generator | None = None) -> None:
        """Training init: matrices ~ N(0, std), norms 1, biases 0 (DeepSeek-V3 uses std 0.006)."""
        for name, p in self.named_parameters():
            if name.endswith("e_score_correction_bias") or name.endswith(".bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)

    @property
    def mtp(self) -> MTPLayer | None:
        """The MTP module (layer `num_hidden_layers`), or None when the config has none."""
        return self.model.layers[self.n_layers] if len(self.model.layers) > self.n_layers else None

    def positions_for(self, input_ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        B, T = input_ids.shape
        return torch.arange(start_pos, start_pos + T, device=input_ids.device).expand(B, T)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, kv=None,
               attention: Attention = Attention.SERVED, doc: torch.Tensor | None = None,
               hooks: Hooks | None = None) -> torch.Tensor:
        """Final (normed) hidden states [B, T, D] of the main stack. `doc` [B, T]: document ids of
        packed rows (attention stays inside a document); `hooks`: what training sees (hooks.py)."""
        if positions is None:
            positions = self.positions_for(input_ids)
        kv = FreshKV() if kv is None else kv
        return self.stack(self.model.embed_tokens(input_ids), positions, kv, attention, doc, hooks)

    def stack(self, h: torch.Tensor, positions: torch.Tensor, kv,
              attention: Attention = Attention.SERVED, doc: torch.Tensor | None = None,
              hooks: Hooks | None = None) -> torch.Tensor:
        """Token embeddings h [B, T, D] at `positions` -> final (normed) hidden states [B, T, D]."""
        cos, sin = self.rotary(positions)
        for layer in islice(self.model.layers, self.n_layers):          # (a slice builds a ModuleList)
            h = layer(h, positions, cos, sin, kv, attention, doc, hooks)
        if decode.applies(self.model.layers[0], h, attention, doc, hooks):    # one token per row:
            return decode.norm(self.model.norm, h)                           # one native call
        return self.model.norm(h)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, kv=None,
                attention: Attention = Attention.SERVED) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (fp32)."""
        return self.logits(self.hidden(input_ids, positions, kv, attention))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., D] -> fp32 logits [..., vocab] (gathered over ranks)."""
        return self.pc.all_gather_last(self.lm_head(h).float())

    def mtp_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, kv=None,
                   attention: Attention = Attention.SERVED) -> torch.Tensor:
        """Predict token t+2 at every position t from the main hidden state h_t [B, T, D] and the
        next tokens `input_ids[:, 1:]`; returns logits [B, T-1, vocab] for t = 0..T-2."""
        h, nxt = hidden[:, :-1], input_ids[:, 1:]
        positions = self.positions_for(nxt)
        cos, sin = self.rotary(positions)
        return self.mtp(h, nxt, positions, cos, sin, FreshKV() if kv is None else kv, attention)
