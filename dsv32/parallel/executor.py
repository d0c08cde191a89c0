"""Tensor/expert-parallel execution on torch.distributed (NCCL on GPUs, gloo on CPU).

Rank 0 runs the whole engine (scheduler, block manager, sampler); every rank holds its slice of
the model and a full copy of the paged latent cache (MLA's latent is shared by all heads). Each
step rank 0 broadcasts the padded batch, all ranks run the forward together (the collectives
live in the model's blocks and heads) and rank 0 samples; with MTP speculation rank 0 then
broadcasts the draft plan and all ranks run the MTP layer. The engine starts the workers itself
(`LLM(..., tensor_parallel_size=N)`), or `torchrun` starts them (`python -m dsv32.launch`).
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import traceback
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv32.engine.runner import ModelRunner, StepInput

from .context import ParallelContext

TIMEOUT = datetime.timedelta(seconds=300)
STOP, FORWARD, COPY, DRAFT = "stop", "forward", "copy", "draft"


def backend_for(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def rank_device(device: str, local_rank: int) -> str:
    """Each GPU rank drives its own device; CPU ranks share the host."""
    return f"cuda:{local_rank}" if str(device).startswith("cuda") else str(device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _broadcast(obj=None):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ParallelRunner(ModelRunner):
    """Rank 0's runner: every forward and cache copy is mirrored on the workers."""

    def __init__(self, model, cache, workers: list):
        super().__init__(model, cache)
        self.workers = workers  # processes this engine spawned (empty under torchrun)

    def _check(self, e: Exception) -> RuntimeError:
        dead = [f"rank {i + 1} (exit code {p.exitcode})" for i, p in enumerate(self.workers)
                if not p.is_alive()]
        who = ", ".join(dead) if dead else "a tensor-parallel worker"
        return RuntimeError(f"tensor-parallel group failed: {who} stopped ({e}); restart the engine")

    def compute(self, x: StepInput) -> torch.Tensor:
        try:
            _broadcast((FORWARD, x))
            return super().compute(x)
        except RuntimeError as e:
            raise self._check(e) from e

    def mtp_draft(self, plan, forwards: int) -> list[list[int]]:
        try:
            _broadcast((DRAFT, (plan, forwards)))
            return super().mtp_draft(plan, forwards)
        except RuntimeError as e:
            raise self._check(e) from e

    def copy_blocks(self, pairs) -> None:
        try:
            _broadcast((COPY, pairs))
        except RuntimeError as e:
            raise self._check(e) from e
        super().copy_blocks(pairs)

    def shutdown(self) -> None:
        try:
            _broadcast((STOP, None))
        except RuntimeError:
            pass
        for p in self.workers:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


def worker_loop(rank: int, world: int, local_rank: int) -> None:
    """A worker rank (process group already initialised): receive the engine's setup from
    rank 0, load this rank's slice of the model, then mirror every forward until told to stop."""
    from dsv32.engine.engine import build_cache, load_engine_model
    cfg, num_blocks = _broadcast()
    cfg = replace(cfg, device=rank_device(cfg.device, local_rank))
    pc = ParallelContext(rank, world, cfg.enable_expert_parallel)
    model = load_engine_model(cfg, pc)
    runner = ModelRunner(model, build_cache(cfg, model.config, num_blocks))
    runner.speculate = cfg.num_speculative_tokens == 1
    with torch.inference_mode():
        while True:
            kind, payload = _broadcast()
            if kind == STOP:
                break
            if kind == COPY:
                runner.copy_blocks(payload)
            elif kind == DRAFT:
                runner.mtp_draft(*payload)
            else:
                runner.compute(payload)


def _spawned_worker(rank: int, world: int, init_method: str, backend: str) -> None:
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=TIMEOUT)
        worker_loop(rank, world, rank)
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)   # peers see the connection drop and fail with a clear error, not a hang


def start_group(cfg) -> tuple[ParallelContext, list]:
    """Make this process rank 0 of a group of `cfg.tensor_parallel_size` ranks: join the torchrun
    group when there is one, else spawn the worker processes on this machine."""
    world = cfg.tensor_parallel_size
    workers = []
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != 0:
            raise RuntimeError(f"torchrun started {dist.get_world_size()} ranks (this is rank "
                               f"{dist.get_rank()}); tensor_parallel_size is {world}")
    else:
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        backend = backend_for(cfg.device)
        ctx = mp.get_context("spawn")
        for rank in range(1, world):
            p = ctx.Process(target=_spawned_worker, args=(rank, world, init_method, backend), daemon=True)
            p.start()
            workers.append(p)
        dist.init_process_group(backend, init_method=init_method, rank=0, world_size=world, timeout=TIMEOUT)
    return ParallelContext(0, world, cfg.enable_expert_parallel), workers


def share_setup(cfg, num_blocks: int) -> None:
    """Send the workers what they need to build their model slice and cache."""
    _broadcast((cfg, num_blocks))
