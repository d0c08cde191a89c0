"""Lightning-indexer scoring and causal top-k without copying the key cache: the keys come as
runs of consecutive positions (views into the store where it allows: a paged cache's runs of
consecutive blocks), scored one cache-sized block at a time, so the [t, H, n] intermediate of the
ReLU head sum never leaves the L2 cache.

The slow obvious reference is `Indexer.scores` + `Indexer.top` (attention.py) over all keys at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from ..fp8 import dequantize_groups
from . import native
from .build import has_compiler

SCORE_BYTES = 2 << 20          # fp32 bytes of one [t*H, n] block of per-head scores


@dataclass(frozen=True)
class FP8Keys:
    """Consecutive keys as an FP8 pool holds them: e4m3 values [n, Di], one fp32 scale per 128 [n, Di/128]."""

    values: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype = torch.float32      # the cache's compute dtype (what its reads dequantise to)

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Keys a..b-1 dequantised to the compute dtype."""
        return dequantize_groups(self.values[a:b], self.scales[a:b], self.dtype)


# One row's keys: (position of the first key, keys [n, Di] or FP8Keys) for consecutive positions,
# or (positions [n] long, keys [n, Di]) for keys gathered from scattered places.
Run = tuple[Union[int, torch.Tensor], Union[torch.Tensor, FP8Keys]]


def index_scores(q: torch.Tensor, w: torch.Tensor, runs: Sequence[Run], S: int) -> torch.Tensor:
    """q [t, H, Di], w [t, H] (fp32) and one row's key runs -> scores [t, S] fp32:
    `sum_h w[t,h] * relu(q[t,h] . k[s])`, -inf where no run holds key s. Per block: a GEMM, then
    the head sum in one native pass on the CPU with a C++ compiler (else relu_ and a bmm); FP8 runs
    or bf16 runs in one native call on AMX tiles where `native.takes_rows`."""
    t, H, D = q.shape
    spans = sorted((pos, pos + keys.shape[0]) for pos, keys in runs if isinstance(pos, int))
    ends = [0] + [b for _, b in spans]                                   # runs of consecutive keys
    tiled = len(spans) == len(runs) and [a for a, _ in spans] == ends[:-1] and ends[-1] == S   # cover 0..S-1
    out = q.new_empty((t, S), dtype=torch.float32)
    if not tiled:                                                        # -inf where no run holds a key
        out.fill_(float("-inf"))
    qf = q.reshape(t * H, D).float()                                     # [t*H, Di]
    w = w.float().contiguous()
    fused = q.device.type == "cpu" and has_compiler()                    # native.head_sum
    n_blk = max(64, SCORE_BYTES // (4 * t * H))
    for pos, keys in runs:
        whole = isinstance(pos, int)                                     # consecutive: written in place
        values, scales = (keys.values, keys.scales) if isinstance(keys, FP8Keys) else (keys, None)
        if whole and q.dtype == torch.float32 and native.takes_rows(q, values, scales):     # fp32 compute
            native.index_scores_rows(q, w, values, scales, out[:, pos:pos + keys.shape[0]])
            continue
        for j in range(0, keys.shape[0], n_blk):
            kb = (keys.rows(j, j + n_blk) if isinstance(keys, FP8Keys) else keys[j:j + n_blk]).float()   # [n, Di]
            s = torch.mm(qf, kb.t())                                     # [t*H, n]
            n = kb.shape[0]
            blk = out[:, pos + j: pos + j + n] if whole else out.new_empty(t, n)   # [t, n]
            if fused:
                native.head_sum(s, w, blk)
            else:
                blk.copy_(torch.bmm(w.view(t, 1, H), s.relu_().view(t, H, n)).view(t, n))
            if not whole:
                out.index_copy_(1, pos[j:j + n_blk], blk)
    return out


def causal_topk(scores: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """scores [t, S], positions [t] -> top-k key ids [t, min(k, S)] among each query's keys at or
    before its position, ascending, -1 after them where fewer are visible; never a -inf score. On
    the CPU with a C++ compiler: native.topk_rows (ties: the lower id; ~0.5 ns a score where
    torch.topk takes 2-5), else `causal_topk_reference`."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and has_compiler():
        return native.topk_rows(scores, positions + 1, min(k, scores.shape[1]))
    return causal_topk_reference(scores, positions, k)


def causal_topk_reference(scores: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """`causal_topk` by torch.topk (scores modified: future keys masked)."""
    S = scores.shape[1]
    lo = int(positions.min()) + 1
    if lo < S:                                                           # only the tail can be future
        future = torch.arange(lo, S, device=scores.device).view(1, -1) > positions.view(-1, 1)
        scores[:, lo:].masked_fill_(future, float("-inf"))
    val, idx = scores.topk(min(k, S), dim=-1)
    return ascending(idx.masked_fill_(val == float("-inf"), -1))


def ascending(ids: torch.Tensor) -> torch.Tensor:
    """Top-k ids [..., K] (-1 = empty) in the order every selection hands them out: ascending, -1
    last (so attention sums over the same keys in the same order, whichever path chose them)."""
    last = torch.iinfo(ids.dtype).max
    ids = ids.masked_fill(ids < 0, last).sort(-1).values
    return ids.masked_fill_(ids == last, -1)


def runs_of(keys: torch.Tensor) -> list[list[Run]]:
    """A contiguous key tensor [B, S, Di] as one run per row."""
    return [[(0, keys[b])] for b in range(keys.shape[0])]
