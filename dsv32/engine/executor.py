"""The model on one rank: its slice of the weights, its paged cache, and the forwards run on them.

Every rank builds its `Executor` with the same constructor. Rank 0's engine calls `compute`,
`mtp` and `copy_blocks`; in a tensor-parallel group each call is first broadcast to the workers,
whose executors (built from the setup rank 0 sends) run it in `serve`, so all ranks meet in the
same collectives (they live in the model's blocks and heads). Every rank holds a full copy of the
paged latent cache (MLA's latent is shared by all heads) and, with MTP speculation, keeps each
forward's hidden states for the MTP layer.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from dsv32.model.checkpoint import load_model
from dsv32.model.config import ModelConfig
from dsv32.model.hooks import Hooks
from dsv32.model.transformer import Transformer
from dsv32.parallel.context import SINGLE, ParallelContext

from .batch import StepInput
from .cache import PagedCache, PagedKV
from .config import EngineConfig
from .heap import reuse_freed_memory
from .group import STOP, Group, broadcast, rank_device
from .sequence import Sequence

# One MTP forward: (forward g of the last ones, packed rows y, (row of g, length) per row of y,
# (row, position) to draft at).
MTPPlan = list[tuple[int, StepInput, list[tuple[int, int]], list[tuple[int, int]]]]


def load_engine_model(cfg: EngineConfig, pc: ParallelContext = SINGLE) -> Transformer:
    """This rank's model (its tensor-parallel slice when `pc` is a group)."""
    return load_model(cfg.model, dtype=cfg.torch_dtype, device=cfg.device,
                      fp8_storage=cfg.fp8_storage, progress=pc.rank == 0, pc=pc,
                      weight_format=cfg.weight_format, prefill_dtype=cfg.prefill_dtype)


def build_cache(cfg: EngineConfig, mc: ModelConfig, num_blocks: int) -> PagedCache:
    return PagedCache(cfg.cache_layers(mc), num_blocks, mc.kv_lora_rank,
                      mc.qk_rope_head_dim, mc.index_head_dim, Sequence.block_size, cfg.torch_dtype,
                      cfg.device, fp8=cfg.cache_fp8, storage=cfg.cache_dtype)


class Executor:
    """This rank's model and paged cache; on rank 0 of a group (`group`), every call runs on all ranks."""

    def __init__(self, cfg: EngineConfig, num_blocks: int, pc: ParallelContext = SINGLE,
                 model: Transformer | None = None, group: Group | None = None):
        self.model = model if model is not None else load_engine_model(cfg, pc)
        if torch.device(cfg.device).type == "cpu":
            reuse_freed_memory()                # the load's garbage returned, prefill's temporaries kept: heap.py
        self.cache = build_cache(cfg, self.model.config, num_blocks)
        self.device = next(self.model.parameters()).device
        self.keep_hidden = cfg.speculative      # the MTP drafts read each forward's hidden states
        self.hiddens: list[torch.Tensor] = []   # [B, T, D] of each forward since the last `mtp`
        self.group = group
        self.fast = None if cfg.kernels == "off" else FastStep(self.model, self.cache, cfg)

    @classmethod
    def start(cls, cfg: EngineConfig, mc: ModelConfig, num_blocks: int,
              model: Transformer | None = None) -> Executor:
        """Rank 0's executor: in this process, or after starting (or joining) the group of
        `cfg.tensor_parallel_size` ranks and sending the workers their setup."""
        if cfg.tensor_parallel_size == 1:
            return cls(cfg, num_blocks, model=model)
        if model is not None:
            raise ValueError("tensor_parallel_size > 1 loads the model on every rank: pass a path, not a model")
        pc = ParallelContext(0, cfg.tensor_parallel_size, cfg.enable_expert_parallel)
        with torch.device("meta"):     # shapes that do not split fail here, before any process starts
            Transformer(mc, pc=pc)
        group = Group.start(cfg.tensor_parallel_size, cfg.device, serve_worker)
        try:
            group.send((cfg, num_blocks))
            return cls(cfg, num_blocks, pc, group=group)
        except BaseException:
            group.close()
            raise

    @contextlib.contextmanager
    def _on_every_rank(self, method: str, *args):
        """Send the call to the workers first; a failed collective names the worker that stopped."""
        if self.group is None:
            yield
            return
        self.group.send((method, args))
        try:
            yield
        except RuntimeError as e:
            raise self.group.failure(e) from e

    @torch.inference_mode()
    def compute(self, x: StepInput, hooks: Hooks | None = None) -> torch.Tensor:
        """One forward over the paged cache -> fp32 logits [B, V] of each row's last new token
        ([B, T, V] of every new token when `x.every`). `hooks` stay on this rank."""
        with self._on_every_rank("compute", x):
            dev = self.device
            if self.fast is not None and hooks is None and not x.every and not self.keep_hidden:
                return self.fast(x)
            kv = PagedKV(self.cache, x.tables.to(dev), x.ctx.to(dev), x.slots.to(dev))
            h = self.model.hidden(x.ids.to(dev), x.pos.to(dev), kv, hooks=hooks)          # [B, T, D]
            if self.keep_hidden:
                self.hiddens.append(h)
            if not x.every:                                                           # [B, D]:
                h = h[:, 0] if h.shape[1] == 1 else h[torch.arange(h.shape[0], device=dev), x.last.to(dev)]
            return self.model.logits(h)

    @torch.inference_mode()
    def mtp(self, plan: MTPPlan, forwards: int) -> list[list[int]]:
        """Run the MTP layer for each entry of `plan` over the hidden states of the last `forwards`
        forwards (writing its cache layer); returns the drafted tokens of each entry, and forgets
        the hidden states kept so far."""
        with self._on_every_rank("mtp", plan, forwards):
            first = len(self.hiddens) - forwards
            out = [self._mtp_one(self.hiddens[first + g], y, picks, want) for g, y, picks, want in plan]
            self.hiddens = []
            return out

    def _mtp_one(self, h: torch.Tensor, y: StepInput, picks, want) -> list[int]:
        dev = self.device
        hs = h.new_zeros(*y.ids.shape, h.shape[-1])
        for i, (b, n) in enumerate(picks):
            hs[i, :n] = h[b, :n]
        kv = PagedKV(self.cache, y.tables.to(dev), y.ctx.to(dev), y.slots.to(dev))
        pos = y.pos.to(dev)
        cos, sin = self.model.rotary(pos)
        hidden = self.model.mtp(hs, y.ids.to(dev), pos, cos, sin, kv, return_hidden=True)  # [B, T, D]
        if not want:
            return []
        rows, cols = zip(*want)
        return self.model.mtp.shared_head(hidden[list(rows), list(cols)]).argmax(-1).tolist()

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy cache blocks (src, dst) on every rank (copy-on-write of forked sequences)."""
        with self._on_every_rank("copy_blocks", pairs):
            self.cache.copy_blocks(pairs)

    def serve(self) -> None:
        """A worker's loop: run every call rank 0 sends until it says stop."""
        with torch.inference_mode():
            while True:
                method, args = broadcast()
                if method == STOP:
                    return
                getattr(self, method)(*args)

    def shutdown(self) -> None:
        """Stop the group's workers and end the group (nothing to do in one process)."""
        if self.group is not None:
            self.group.close()


class FastStep:
    """Plain forwards (no hooks, last-token logits, no hidden states kept) through `dsv32.kernels`:
    decodes replayed as CUDA graphs on a GPU (padded to batch and table-width buckets), prefill
    chunks run directly. Imported only when asked for, so a CPU install never loads Triton."""

    def __init__(self, model: Transformer, cache: PagedCache, cfg: EngineConfig):
        if cfg.tensor_parallel_size > 1:
            raise ValueError("kernels: the fast paths run on one device (tensor_parallel_size 1)")
        from dsv32.kernels.graphs import BATCH_BUCKETS, GraphedStep
        from dsv32.kernels.layer import STEP_ARGS, FastModel
        self.model = FastModel(model, cache, cfg.kernels)
        widths = [1 << i for i in range(max(1, (cfg.max_model_len or 8192) // cache.block_size).bit_length() + 1)]
        self.graphed = GraphedStep(self.model.step, STEP_ARGS, [b for b in BATCH_BUCKETS if b <= cfg.max_num_seqs]
                                   or [1], widths, use_graphs=str(cfg.device).startswith("cuda"))
        self.device = next(model.parameters()).device

    def __call__(self, x: StepInput) -> torch.Tensor:
        ids, pos, slots, tables, last = (t.to(self.device) for t in (x.ids, x.pos, x.slots, x.tables, x.last))
        step = self.graphed if x.ids.shape[1] == 1 else self.model.step
        return step(ids, pos, slots, tables, last)


def serve_worker(rank: int, world: int, local_rank: int) -> None:
    """A worker rank, group joined: build this rank's executor from rank 0's setup and serve it."""
    cfg, num_blocks = broadcast()
    cfg = replace(cfg, device=rank_device(cfg.device, local_rank))
    Executor(cfg, num_blocks, ParallelContext(rank, world, cfg.enable_expert_parallel)).serve()
