"""Feed-forward blocks: SwiGLU MLP, the sigmoid no-aux (noaux_tc) Gate, and the MoE layer."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .hooks import Hooks, RouteView
from .layers import Linear
from dsv32.parallel.context import SINGLE, ParallelContext


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); under tensor parallelism the inner dimension is split
    (gate/up column-parallel, down row-parallel) and the output is a partial sum over ranks."""

    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype | None = None,
                 pc: ParallelContext = SINGLE):
        super().__init__()
        i0, i1 = pc.split(inter_dim, "intermediate size")
        split = pc.enabled
        self.gate_proj = Linear(dim, i1 - i0, dtype=dtype, shard=(0, i0, i1) if split else None)
        self.up_proj = Linear(dim, i1 - i0, dtype=dtype, shard=(0, i0, i1) if split else None)
        self.down_proj = Linear(i1 - i0, dim, dtype=dtype, shard=(1, i0, i1) if split else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Routing(NamedTuple):
    """The Gate's decision for N tokens."""

    weights: torch.Tensor    # [N, k] fp32 combine weights (routed_scaling_factor applied)
    ids: torch.Tensor        # [N, k] expert ids
    scores: torch.Tensor     # [N, E] fp32 sigmoid affinities s


class Gate(nn.Module):
    """Sigmoid router with fp32 bias-corrected, group-limited top-k selection (noaux_tc)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.topk = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scaling, self.norm = cfg.routed_scaling_factor, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(cfg.n_routed_experts, dtype=torch.float32), requires_grad=False)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> sigmoid affinities s [N, E] in fp32."""
        return F.linear(x.float(), self.weight.float()).sigmoid()

    @torch.no_grad()
    def select(self, s: torch.Tensor) -> torch.Tensor:
        """Expert ids [N, k] chosen on biased scores within the best `topk_group` groups."""
        biased = s + self.e_score_correction_bias
        if self.n_group > 1:
            g = biased.view(-1, self.n_group, self.n_experts // self.n_group)     # [N, G, E/G]
            group_score = g.topk(2, dim=-1).values.sum(-1)                        # [N, G]
            keep = group_score.topk(self.topk_group, dim=-1).indices
            gmask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            biased = g.masked_fill(~gmask.unsqueeze(-1), float("-inf")).flatten(1)
        return biased.topk(self.topk, dim=-1).indices

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None) -> Routing:
        """x [N, D] -> Routing: combine weights [N, k], expert ids [N, k], affinities s [N, E].

        `replay` [N, k] forces recorded experts (GRPO Keep Routing), -1 where routing is free;
        the weights still come from s.
        """
        s = self.scores(x)
        ids = self.select(s)
        if replay is not None:
            ids = torch.where(replay >= 0, replay, ids)
        w = s.gather(1, ids)
        if self.norm:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return Routing(w * self.scaling, ids, s)


class MoE(nn.Module):
    """Routed SwiGLU experts mixed by the Gate, plus the always-on shared expert(s).

    Tensor parallel: every expert's inner dimension is split across ranks. Expert parallel: each
    rank holds whole experts for its slice of expert ids (the others are None) and computes them
    for the tokens routed there (dispatch); the block's all-reduce sums the ranks (combine).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype | None = None,
                 pc: ParallelContext = SINGLE):
        super().__init__()
        self.layer_idx, self.n_experts = layer_idx, cfg.n_routed_experts
        ep = pc.enabled and pc.expert_parallel
        self.local = range(*pc.split(cfg.n_routed_experts, "n_routed_experts")) if ep \
            else range(cfg.n_routed_experts)
        self.gate = Gate(cfg)
        expert_pc = SINGLE if ep else pc
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size, dtype, expert_pc) if i in self.local else None
            for i in range(cfg.n_routed_experts))
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype, pc)
        self.packed = None   # PackedExperts after `pack_experts`: sync-free dispatch (GPU path)

    def pack_experts(self, packed) -> None:
        """Dispatch routed tokens through `packed` (dsv32.kernels.grouped.PackedExperts: the experts'
        weights stacked, tokens dispatched on the device without host syncs) instead of the
        per-expert loop `routed`, which stays the reference."""
        self.packed = packed

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, run=None) -> torch.Tensor:
        """Sum of the local experts' outputs: x [N, D], weights/ids [N, k] -> [N, D]. `run(mlp,
        x)` computes one expert (default: `mlp(x)`)."""
        y = torch.zeros_like(x)
        counts = torch.bincount(ids.flatten(), minlength=self.n_experts).tolist()
        for e in self.local:
            if counts[e] == 0:
                continue
            tok, slot = torch.where(ids == e)
            xe = x[tok]
            out = (self.experts[e](xe) if run is None else run(self.experts[e], xe)) * weights[tok, slot, None].to(x.dtype)
            y.index_add_(0, tok, out)
        return y

    def forward(self, x: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; `hooks.replay` forces experts, `hooks.route` sees the routing."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                      # [N, D]
        r = self.gate(x, self._replay(hooks))
        if hooks is not None and hooks.route is not None:
            lead = shape[:-1]                                             # [N, .] -> [B, T, .]
            hooks.route(self.layer_idx, RouteView(r.scores.unflatten(0, lead), r.ids.unflatten(0, lead)))
        if self.packed is not None:
            y = self.packed(x, r.weights, r.ids)
            return (y if self.packed.shared_folded else y + self.shared_experts(x)).view(shape)
        return (self.routed(x, r.weights, r.ids) + self.shared_experts(x)).view(shape)

    def _replay(self, hooks: Hooks | None) -> torch.Tensor | None:
        """The recorded experts [N, k] this layer must use (-1: free), when the hooks replay some."""
        r = None if hooks is None or hooks.replay is None else hooks.replay.get(self.layer_idx)
        return None if r is None else r.reshape(-1, self.gate.topk).to(self.gate.weight.device)
