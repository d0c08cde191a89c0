"""The processes of a tensor-parallel group, as rank 0 sees them, and their lifetime.

Rank 0 joins the group torchrun made (`python -m dsv32.launch`), or makes one: it opens a TCPStore,
spawns ranks 1..N-1 on this machine and waits for each to check in, watching them as it waits, so
a worker that dies before joining fails the start at once with the worker's error. A group this
process made ends with `close()`, or when its `Group` is garbage-collected (workers told to stop,
then joined, the process group destroyed); it is never taken for a torchrun group.
"""
from __future__ import annotations

import datetime
import gc
import os
import sys
import time
import traceback
import weakref
from typing import Callable

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=300)
STOP = "stop"                 # the message that ends a worker's loop
JOINED = "dsv32/joined"       # store counter: workers about to join the process group
POLL_S = 0.05
# Groups this process made and has not closed (weak: a dropped engine's group closes on collection).
_OWNED: weakref.WeakSet[Group] = weakref.WeakSet()

Serve = Callable[[int, int, int], None]   # (rank, world, local_rank) -> runs until rank 0 says STOP


def backend_for(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def rank_device(device: str, local_rank: int) -> str:
    """Each GPU rank drives its own device; CPU ranks share the host."""
    return f"cuda:{local_rank}" if str(device).startswith("cuda") else str(device)


def broadcast(obj=None):
    """Rank 0 sends `obj` to every rank; the others receive and return it."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _error_key(rank: int) -> str:
    return f"dsv32/error/{rank}"


class Group:
    """Rank 0's handle on a tensor-parallel group: its spawned workers, their error store, its teardown."""

    def __init__(self, world: int, workers: list, store: dist.Store | None):
        self.world, self.workers, self.store = world, workers, store
        self.pg = dist.group.WORLD
        self._finalizer = weakref.finalize(self, _close, workers, self.pg)
        if workers:
            _OWNED.add(self)

    @classmethod
    def start(cls, world: int, device: str, serve: Serve) -> Group:
        """Rank 0 of `world` ranks: torchrun's group when there is one, else a new group whose
        workers run `serve` (a module-level function: spawn pickles it by name)."""
        if _torchrun_group():
            if dist.get_world_size() != world or dist.get_rank() != 0:
                raise RuntimeError(f"torchrun started {dist.get_world_size()} ranks (this is rank "
                                   f"{dist.get_rank()}); tensor_parallel_size is {world}")
            return cls(world, [], None)
        return cls(world, *_spawn(world, backend_for(device), serve))

    def send(self, obj) -> None:
        """Broadcast `obj` to the workers; a failed send names the worker that stopped."""
        try:
            broadcast(obj)
        except RuntimeError as e:
            raise self.failure(e) from e

    def failure(self, e: Exception) -> RuntimeError:
        """The error of a collective that failed: which workers stopped, and why when they said."""
        dead = [f"rank {r} (exit code {p.exitcode}){_said(self.store, r)}"
                for r, p in enumerate(self.workers, 1) if not p.is_alive()]
        who = ", ".join(dead) if dead else "a tensor-parallel worker"
        return RuntimeError(f"tensor-parallel group failed: {who} stopped ({e}); restart the engine")

    def close(self) -> None:
        """Stop the workers and end the group (once; later calls do nothing)."""
        self._finalizer()


def _close(workers: list, pg) -> None:
    """Tell the workers to stop, wait for them (killing the stuck), and destroy the group if it is
    still this process's default group."""
    ours = dist.is_initialized() and dist.group.WORLD is pg
    if ours:
        try:
            broadcast((STOP, ()))
        except RuntimeError:
            pass
    for p in workers:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            p.join(timeout=10)
    if ours:
        dist.destroy_process_group()


def _torchrun_group() -> bool:
    """Whether a process group made elsewhere (torchrun) is there to join. A group of an engine
    this process still holds is an error; one whose engine was dropped is closed first."""
    if dist.is_initialized() and _held():
        gc.collect()          # an engine dropped inside a reference cycle closes its group now
        if dist.is_initialized() and _held():
            raise RuntimeError("this process already runs a tensor-parallel engine (one process group "
                               "per process): shut it down first (llm.shutdown(), `del llm`, or "
                               "`with LLM(...) as llm:`); rebinding `llm = LLM(...)` builds the new one first")
    return dist.is_initialized()


def _held() -> bool:
    return any(g.pg is dist.group.WORLD for g in _OWNED)


def _spawn(world: int, backend: str, serve: Serve) -> tuple[list, dist.Store]:
    """Start ranks 1..world-1 on this machine and join them as rank 0; fails fast when one dies first."""
    _check_main_module()
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_worker, args=(rank, world, store.port, backend, serve),
                           name=f"dsv32-tp-rank{rank}", daemon=True) for rank in range(1, world)]
    try:
        for p in workers:
            p.start()
        _wait_for(store, workers)
        dist.init_process_group(backend, store=store, rank=0, world_size=world, timeout=TIMEOUT)
    except BaseException:
        for p in workers:
            p.kill()
            p.join(timeout=10)
        raise
    return workers, store


def _wait_for(store: dist.Store, workers: list) -> None:
    """Wait until every worker has checked in; raise as soon as one has exited instead."""
    deadline = time.monotonic() + TIMEOUT.total_seconds()
    while store.add(JOINED, 0) < len(workers):
        dead = [(r, p) for r, p in enumerate(workers, 1) if p.exitcode is not None]
        if dead:
            raise RuntimeError("; ".join(_died(store, r, p) for r, p in dead))
        if time.monotonic() > deadline:
            raise TimeoutError(f"tensor-parallel workers did not start within {TIMEOUT}")
        time.sleep(POLL_S)


def _died(store: dist.Store, rank: int, p) -> str:
    said = _said(store, rank)
    if not said:
        main = getattr(sys.modules.get("__main__"), "__file__", None) or "the main module"
        said = (f": its traceback is on stderr (a spawned worker re-imports {main}; code at its top "
                f"level that must run only once belongs under `if __name__ == \"__main__\":`)")
    return f"tensor-parallel worker rank {rank} exited with code {p.exitcode} before joining the group{said}"


def _said(store: dist.Store | None, rank: int) -> str:
    """The last line of the error a worker left in the store, as ': ...' (empty when none)."""
    if store is None or not store.check([_error_key(rank)]):
        return ""
    lines = store.get(_error_key(rank)).decode(errors="replace").strip().splitlines()
    return f": {lines[-1]}" if lines else ""


def _check_main_module() -> None:
    """Spawned workers re-import the main module from its file: refuse one that has no file."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if getattr(main, "__spec__", None) is None and path is not None and not os.path.isfile(path):
        raise RuntimeError(f"tensor-parallel workers are spawned processes, which re-import the main "
                           f"module, and {path!r} cannot be re-imported (a script read on stdin?): run "
                           f"the script from a file, or start the ranks with torchrun (docs/deploy.md)")


def _worker(rank: int, world: int, port: int, backend: str, serve: Serve) -> None:
    """A spawned worker: check in, join the group, serve; on failure leave the error in the store
    and exit, so rank 0 fails with it instead of waiting."""
    store = None
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=TIMEOUT)
        store.add(JOINED, 1)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=TIMEOUT)
        serve(rank, world, rank)
        dist.destroy_process_group()
    except BaseException:
        text = traceback.format_exc()
        print(f"dsv32 tensor-parallel worker rank {rank}:\n{text}", file=sys.stderr, flush=True)
        if store is not None:
            try:
                store.set(_error_key(rank), text)
            except Exception:
                pass
        os._exit(1)   # peers see the connection drop and fail with a clear error, not a hang
