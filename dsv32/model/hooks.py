"""Typed hooks of one forward: what training sees of the lightning indexer, the main attention and
the MoE routing, and the routing it replays (GRPO Keep Routing). Inference passes none (the
default), and the forward then does none of this work."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class IndexView:
    """One attention layer's DSA quantities for its queries [B, T] over its keys [S]."""

    scores: torch.Tensor     # [B, T, S] fp32 index scores I_{t,s}; the gradient reaches the indexer only
    visible: torch.Tensor    # [B, T, S] bool: keys a query may attend to (causal, same document)
    selected: torch.Tensor   # [B, T, S] bool: the indexer's top-k of the visible keys
    attention: torch.Tensor  # [B, H, T, S] main attention probabilities over the visible keys
                             # (no gradient)


@dataclass(frozen=True)
class RouteView:
    """One MoE layer's routing of its tokens [B, T]."""

    scores: torch.Tensor     # [B, T, E] fp32 sigmoid affinities s (with gradient)
    ids: torch.Tensor        # [B, T, k] the experts each token went to (chosen or replayed)


@dataclass(frozen=True)
class Hooks:
    """What a forward hands to, or takes from, training; each part left None costs nothing."""

    index: Callable[[int, IndexView], None] | None = None  # (layer, view) of every attention layer,
                                                           # which then scores every key
    route: Callable[[int, RouteView], None] | None = None  # (layer, view) of every MoE layer
    replay: Mapping[int, torch.Tensor] | None = None        # MoE layer -> expert ids [B, T, k] to
                                                           # force (Keep Routing), -1 where free
