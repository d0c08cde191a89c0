"""CUDA graphs for a step callable: inputs padded to static shapes (batch buckets, and buckets of
a width dimension such as the block tables'), one graph captured per bucket and replayed with the
inputs copied into its static buffers. Where graphs cannot run (CPU, `use_graphs=False`) the same
padding runs eagerly, so the bucket and padding logic is tested without a GPU.

The step must have static shapes and no host syncs (`FastModel.step`); its padding rows must be
harmless (ids 0, slot -1: `paged.write` redirects them, position 0, block 0) and rows must not
interact (each output row depends on its own inputs only).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)


def bucket(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket >= n, or None when n exceeds them all."""
    return next((b for b in sorted(buckets) if b >= n), None)


class Arg(NamedTuple):
    """How one input is padded: `fill` for padding rows (dim 0) and, with `width`, for the
    padding columns of dim 1 (then bucketed by the width buckets)."""

    fill: int | float = 0
    width: bool = False


def pad(x: torch.Tensor, rows: int, fill, cols: int | None = None) -> torch.Tensor:
    """x [B, ...] -> [rows, ...] (and [rows, cols, ...] when cols is given), padded with fill."""
    shape = (rows,) if x.dim() == 1 else (rows, cols or x.shape[1], *x.shape[2:])
    return fill_into(x.new_empty(shape), x, fill)


def fill_into(buf: torch.Tensor, x: torch.Tensor, fill) -> torch.Tensor:
    """buf [R, (W,) ...] <- x in its leading corner, fill elsewhere."""
    buf.fill_(fill)
    buf[tuple(slice(0, n) for n in x.shape[:2])].copy_(x)
    return buf


class GraphedStep:
    """`fn(*inputs) -> out [B, ...]` run at padded bucket shapes, as CUDA graphs where possible."""

    def __init__(self, fn: Callable[..., torch.Tensor], args: Sequence[Arg],
                 batch_buckets: Sequence[int] = BATCH_BUCKETS, width_buckets: Sequence[int] = (),
                 use_graphs: bool = True, warmup: int = 2):
        self.fn, self.args = fn, list(args)
        self.batch_buckets, self.width_buckets = sorted(batch_buckets), sorted(width_buckets)
        self.use_graphs, self.warmup = use_graphs, warmup
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.pool = None
        self.eager_calls = 0          # calls that fell outside the buckets (run unpadded, eagerly)

    def key(self, inputs: Sequence[torch.Tensor]) -> tuple[int, int] | None:
        """(batch bucket, width bucket; 0 without width inputs) for these inputs, or None."""
        B = bucket(inputs[0].shape[0], self.batch_buckets)
        widths = [x.shape[1] for x, a in zip(inputs, self.args) if a.width]
        W = bucket(max(widths), self.width_buckets) if widths else 0
        return None if B is None or W is None else (B, W)

    def padded(self, inputs: Sequence[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
        B, W = key
        return [pad(x, B, a.fill, W if a.width else None) for x, a in zip(inputs, self.args)]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.args):
            raise ValueError(f"GraphedStep: expected {len(self.args)} inputs, got {len(inputs)}")
        n = inputs[0].shape[0]
        key = self.key(inputs)
        if key is None:
            self.eager_calls += 1
            return self.fn(*inputs)
        if not (self.use_graphs and inputs[0].is_cuda):
            return self.fn(*self.padded(inputs, key))[:n]
        if key not in self.graphs:
            self.capture(key, self.padded(inputs, key))
        graph, static, out = self.graphs[key]
        for buf, x, a in zip(static, inputs, self.args):
            fill_into(buf, x, a.fill)
        graph.replay()
        return out[:n].clone()

    def capture(self, key: tuple[int, int], static: list[torch.Tensor]) -> None:
        """Warm up on a side stream (compilation, workspaces), then capture fn on `static`."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*static)
        self.graphs[key] = (graph, static, out)
