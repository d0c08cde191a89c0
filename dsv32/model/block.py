"""The decoder block shared by the main stack and the MTP layer."""
from __future__ import annotations

import torch
from torch import nn

from . import decode
from .attention import MLA, Attention
from .config import ModelConfig
from .hooks import Hooks
from .layers import RMSNorm
from .moe import MLP, MoE
from dsv32.parallel.context import SINGLE, ParallelContext


class Block(nn.Module):
    """Pre-norm residual block: h += attn(norm(h)); h += ffn(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype | None = None,
                 fp8_sim: bool = False, pc: ParallelContext = SINGLE):
        super().__init__()
        self.layer_idx, self.pc = layer_idx, pc
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = MLA(cfg, layer_idx, dtype, fp8_sim=fp8_sim, pc=pc)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MoE(cfg, layer_idx, dtype, pc) if cfg.is_moe_layer(layer_idx) else MLP(
            cfg.hidden_size, cfg.intermediate_size, dtype, pc)

    def forward(self, h, positions, cos, sin, kv, attention: Attention = Attention.SERVED,
                doc: torch.Tensor | None = None, hooks: Hooks | None = None):
        if decode.applies(self, h, attention, doc, hooks):   # CPU decode, one token per row
            return decode.step(self, h, positions, cos, sin, kv)
        return self.reference(h, positions, cos, sin, kv, attention, doc, hooks)

    def reference(self, h, positions, cos, sin, kv, attention: Attention = Attention.SERVED,
                  doc: torch.Tensor | None = None, hooks: Hooks | None = None):
        """The eager forward (every case; the reference of model/decode.py)."""
        # attention and FFN outputs are partial sums under tensor parallelism: reduce them here
        a = self.self_attn(self.input_layernorm(h), positions, cos, sin, kv, attention, doc, hooks)
        h = h + self.pc.all_reduce(a)
        x = self.post_attention_layernorm(h)
        return h + self.pc.all_reduce(self.mlp(x, hooks) if isinstance(self.mlp, MoE) else self.mlp(x))
