"""The training forward: the model's own forward with typed hooks (dsv32.model.hooks), and the DSA
losses and statistics computed from what they show (index scores, main attention, routing).

Stages (DSA continued pre-training, DeepSeek-V3.2-Exp):
  * dense: causal attention over all keys; the indexer is not used;
  * warmup: dense attention; indexer loss KL(p_t || softmax(I_t)) over all causal keys, where p_t
    is the main attention summed over heads and L1-normalised (only the indexer should train);
  * sparse: each query attends to the top-`index_topk` keys of the indexer; indexer loss is the
    same KL restricted to the selected set.
The indexer always reads detached inputs, so it learns only from its KL loss and the model only from
the LM loss. Indexer recall (the dense attention mass inside the top-k set, over queries that have
more than k causal keys) is measured whenever the indexer runs.

Batches whose rows share a token prefix (system prompt + tools) run that prefix once: a batch-1
forward whose keys reach every row's suffix forward like a cache (kv.PrefixKV). Results equal the
plain forward. MoE routing can be replayed (GRPO Keep Routing): `replay[layer]` [B, T, k] with -1
for positions that route freely.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from functools import partial

import torch

from dsv32.model.attention import Attention
from dsv32.model.hooks import Hooks, IndexView, RouteView
from dsv32.model.kv import FreshKV, PrefixKV
from dsv32.model.transformer import Transformer

from .losses import attention_target, expert_load, indexer_kl, recall, sequence_balance_loss


class Stage(str, Enum):
    """A DSA training stage; its attention is dense but in the sparse stage."""

    DENSE = "dense"
    WARMUP = "warmup"
    SPARSE = "sparse"

    @property
    def attention(self) -> Attention:
        return Attention.TOPK_MASKED if self is Stage.SPARSE else Attention.DENSE


@dataclass
class Stats:
    """Side results of one forward."""

    index_loss: torch.Tensor | float = 0.0
    balance_loss: torch.Tensor | float = 0.0
    recalls: list[float] = field(default_factory=list)
    loads: dict[int, torch.Tensor] = field(default_factory=dict)   # MoE layer -> tokens per expert
    routing: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> ids [B, T, k]

    @property
    def recall(self) -> float | None:
        return sum(self.recalls) / len(self.recalls) if self.recalls else None


Key = tuple[int, int]   # (layer, stream): stream 0 is the shared prefix when there is one


@dataclass
class _Observer:
    """Turns what the hooks show into losses and statistics. Terms are kept per (layer, stream)
    and summed in that order, whichever order the streams ran in."""

    stage: Stage
    topk: int
    measure: bool
    alpha: float
    record: bool
    index_kl: dict[Key, torch.Tensor] = field(default_factory=dict)
    balance: dict[Key, torch.Tensor] = field(default_factory=dict)
    recalls: dict[Key, float] = field(default_factory=dict)
    loads: dict[Key, torch.Tensor] = field(default_factory=dict)
    routing: dict[Key, torch.Tensor] = field(default_factory=dict)

    def hooks(self, stream: int, valid: torch.Tensor, replay: dict[int, torch.Tensor] | None) -> Hooks:
        """The hooks of one stream, whose real tokens are `valid` [b, t]."""
        see_index = self.stage is not Stage.DENSE or self.measure
        return Hooks(index=partial(self._index, stream, valid) if see_index else None,
                     route=partial(self._route, stream, valid), replay=replay)

    def _index(self, stream: int, valid: torch.Tensor, layer: int, view: IndexView) -> None:
        key = (layer, stream)
        with torch.no_grad():
            p = attention_target(view.attention)                         # [b, t, S]
            rows = valid & (view.visible.sum(-1) > self.topk)
            if rows.any():
                self.recalls[key] = float(recall(p, view.selected, rows))
        if self.stage is Stage.WARMUP:
            self.index_kl[key] = indexer_kl(p, view.scores, view.visible, valid)
        elif self.stage is Stage.SPARSE:
            self.index_kl[key] = indexer_kl(p, view.scores, view.selected, valid)

    def _route(self, stream: int, valid: torch.Tensor, layer: int, view: RouteView) -> None:
        key, k = (layer, stream), view.ids.shape[-1]
        if self.alpha:
            self.balance[key] = sequence_balance_loss(view.scores, view.ids, valid, k, self.alpha)
        self.loads[key] = expert_load(view.ids, view.scores.shape[-1], valid)
        if self.record:
            self.routing[key] = view.ids

    def stats(self, batch: int) -> Stats:
        recalls = [self.recalls[key] for key in sorted(self.recalls)]
        st = Stats(_sum(self.index_kl), _sum(self.balance), recalls)
        for (layer, _), load in sorted(self.loads.items()):
            st.loads[layer] = st.loads.get(layer, 0) + load
        for (layer, _), ids in sorted(self.routing.items()):              # streams joined: [B, T, k]
            prev = st.routing.get(layer)
            ids = ids.expand(batch, -1, -1)
            st.routing[layer] = ids if prev is None else torch.cat((prev, ids), dim=1)
        return st


def _sum(terms: dict[Key, torch.Tensor]) -> torch.Tensor | float:
    total = 0.0
    for key in sorted(terms):
        total = total + terms[key]
    return total


Run = Callable[[torch.Tensor, torch.Tensor, FreshKV, torch.Tensor | None, Hooks], torch.Tensor]


def _cuts(prefix: int) -> list[tuple[slice, slice]]:
    """(rows, columns) of each stream: row 0's first `prefix` tokens, then every row's rest."""
    if prefix <= 0:
        return [(slice(None), slice(None))]
    return [(slice(0, 1), slice(0, prefix)), (slice(None), slice(prefix, None))]


def _run_streams(run: Run, h: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                 doc: torch.Tensor | None, prefix: int, obs: _Observer,
                 replay: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """`run(h, positions, kv, doc, hooks)` over the rows' shared first `prefix` tokens once (batch
    1), then over every row's rest with the prefix's keys; h [B, T, D] -> the rows joined [B, T, D]."""
    kv, outs = None, []
    for stream, cut in enumerate(_cuts(prefix)):
        kv = FreshKV() if kv is None else PrefixKV(kv)
        rep = None if replay is None else {layer: r[cut] for layer, r in replay.items()}
        outs.append(run(h[cut], positions[cut], kv, None if doc is None else doc[cut],
                        obs.hooks(stream, valid[cut], rep)))
    return torch.cat([o.expand(h.shape[0], -1, -1) for o in outs], dim=1)


def forward(model: Transformer, ids: torch.Tensor, valid: torch.Tensor | None = None, prefix: int = 0,
            stage: Stage | str = Stage.DENSE, doc: torch.Tensor | None = None, mtp: bool = True,
            measure: bool = False, alpha: float = 0.0, replay: dict[int, torch.Tensor] | None = None,
            record: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, Stats]:
    """ids [B, T] -> (final normed hidden [B, T, D], MTP hidden before its head [B, T-1, D] or
    None, Stats). `valid` [B, T] marks real tokens, `prefix` the tokens shared by every row,
    `doc` [B, T] conversation ids of packed rows (attention stays inside a conversation; needs
    prefix 0), `measure` computes indexer recall in the dense stage too, `alpha` the sequence-wise
    balance loss weight, `replay` MoE routing to force, `record` keeps the routing in Stats."""
    stage = Stage(stage)
    if doc is not None and prefix:
        raise ValueError("packed rows (doc) and a shared prefix do not mix")
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.bool()
    obs = _Observer(stage, model.config.index_topk, measure, alpha, record)

    def stack(h, positions, kv, doc, hooks):
        return model.stack(h, positions, kv, stage.attention, doc, hooks)

    hidden = _run_streams(stack, model.model.embed_tokens(ids), model.positions_for(ids), valid, doc,
                          prefix, obs, replay)
    mtp_hidden = None
    if mtp and model.mtp is not None:
        mtp_hidden = _mtp_forward(model, hidden, ids, valid, prefix, doc, obs)
    return hidden, mtp_hidden, obs.stats(ids.shape[0])


def _mtp_forward(model: Transformer, hidden, ids, valid, prefix, doc, obs: _Observer) -> torch.Tensor:
    """MTP block over (h_t, token t+1) for t = 0..T-2 -> shared_head.norm output [B, T-1, D]; its
    first prefix-1 positions see only prefix tokens, so they are shared by every row."""
    mtp, nxt = model.mtp, ids[:, 1:]
    pos = model.positions_for(nxt)

    def block(x, positions, kv, doc, hooks):
        return mtp.block(x, positions, *model.rotary(positions), kv, obs.stage.attention, doc, hooks)

    x = mtp.combine(hidden[:, :-1], nxt, pos)                            # [B, T-1, D]
    out = _run_streams(block, x, pos, valid[:, 1:], None if doc is None else doc[:, 1:],
                       prefix - 1 if prefix > 1 else 0, obs)
    return mtp.shared_head.norm(out)
