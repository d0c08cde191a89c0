"""torch.compile (inductor) for the kernels: one compiled function per static key, and a clear
error naming what is missing when inductor cannot build a kernel (it needs a C++ compiler at run
time)."""
from __future__ import annotations

import types
from typing import Callable

import torch


class KernelError(RuntimeError):
    """A compiled kernel could not be built; the message names what is missing."""


_compiled: dict[tuple, Callable] = {}


def require_compiler() -> None:
    """Raise KernelError unless inductor finds a C++ compiler."""
    from torch._inductor import cpp_builder
    try:
        cpp_builder.get_cpp_compiler()
    except Exception as e:                                  # noqa: BLE001  (re-raised, explained)
        raise KernelError(
            "the packed weight formats (bf16/fp16/int8/fp8) compile their CPU kernels with "
            "torch.compile (inductor), which needs a C++ compiler at run time (g++ or clang++ on PATH): "
            f"{e}") from e


def kernel(fn: Callable, *key) -> Callable:
    """`fn` compiled for one static `key` (e.g. the reduction sizes). Every key gets its own code
    object, so its own dynamo cache: different keys never count against one recompile limit, and
    dims that stay static in a key are never turned dynamic by a later call."""
    k = (fn.__module__, fn.__qualname__, *key)
    f = _compiled.get(k)
    if f is None:
        require_compiler()
        name = f"{fn.__name__}__" + "_".join(str(p) for p in key)
        code = fn.__code__.replace(co_name=name)
        clone = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        f = _compiled[k] = _explained(torch.compile(clone, dynamic=False, fullgraph=True), name)
    return f


def _explained(f: Callable, name: str) -> Callable:
    def call(*args):
        try:
            return f(*args)
        except (torch._dynamo.exc.BackendCompilerFailed, OSError) as e:
            raise KernelError(f"inductor could not build kernel {name} (a C++ compiler and the "
                              f"Python headers are needed at run time): {e}") from e
    return call


def dynamic(t: torch.Tensor, *dims: int) -> torch.Tensor:
    """Mark `dims` of an activation `t` dynamic for compiled calls (sizes > 1 only: size 1 stays
    specialised). Not for parameters: dynamo keeps their shapes static (and a mark on one makes
    every graph that was traced without it recompile)."""
    if not hasattr(t, "_dynamo_dynamic_indices"):
        for d in dims:
            if t.shape[d] > 1:
                torch._dynamo.mark_dynamic(t, d)
    return t
