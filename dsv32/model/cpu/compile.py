"""Compiled CPU kernels (inductor): one `Kernel` per function and static key, and a clear error
naming what is missing when inductor cannot build one (it needs a C++ compiler at run time: the
one build.py finds).

A call with static shapes (every decode of one row) runs a graph that `Kernel` traced itself
(make_fx, the modules' weights as inputs) and built with inductor, called directly: ~5 us of
dispatch, where a torch.compile'd function spends ~30 us a call in dynamo's cache lookup and
wrappers (bench/README.md, "Decode step"). Graphs are cached by what the traced code depends on:
the shapes, strides and dtypes of the tensors, the values of other arguments. A dim marked
`dynamic` (batched decode: one graph for every batch size) is traced symbolic, on fake tensors,
and called the same way: torch.compile's dynamo spent ~130 us a call checking its guards on a
block's ~40 tensors (bench/README.md, "Throughput").
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

from .build import KernelError, require_compiler

_kernels: dict[tuple, "Kernel"] = {}


def kernel(fn: Callable, *key) -> "Kernel":
    """`fn` compiled for one static `key` (e.g. the reduction sizes): a graph for each signature of
    its calls (shapes, strides, dtypes; a `dynamic` dim's size left open)."""
    k = (fn.__module__, fn.__qualname__, *key)
    f = _kernels.get(k)
    if f is None:
        require_compiler()
        f = _kernels[k] = Kernel(fn, f"{fn.__name__}__" + "_".join(str(p) for p in key))
    return f


def _dims(t: torch.Tensor) -> tuple[int, ...]:
    """The dims of `t` marked `dynamic`."""
    return tuple(sorted(getattr(t, "_dynamo_dynamic_indices", ())))


def _meta(t: torch.Tensor) -> tuple:
    """What a graph is keyed by: shape (None at a dynamic dim), strides, dtype, device."""
    dims = _dims(t)
    shape = tuple(None if i in dims else n for i, n in enumerate(t.shape)) if dims else t.shape
    return shape, t.stride(), t.dtype, t.device, dims


def _tensors_of(module: nn.Module) -> list[tuple[dict, str]]:
    """Where each tensor of `module` lives: (its submodule's parameter or buffer dict, name)."""
    return [(d, n) for m in module.modules() for d in (m._parameters, m._buffers)
            for n, t in d.items() if t is not None]


class _Bound:
    """A graph as one module calls it: the module tensors it reads (fetched fresh at every call;
    while they are the objects it was built with, no other check is needed) and the graph."""

    def __init__(self, where: list[tuple[dict, str]], graph: Callable):
        self.where, self.graph = where, graph
        self.tensors = [d[n] for d, n in where]

    def inputs(self) -> list[torch.Tensor] | None:
        now = [d[n] for d, n in self.where]
        return now if all(a is b for a, b in zip(now, self.tensors)) else None


class Kernel:
    """A function of at most one module, tensors and other (static) values, compiled by inductor."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        # (state meta of the module, call signature) -> (indices of the module tensors read, graph):
        # modules of one shape (the layers of a stack) share a graph
        self.graphs: dict[tuple, tuple[list[int], Callable]] = {}
        self.bound: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Bound]] = weakref.WeakKeyDictionary()
        self.plain: dict[tuple, Callable] = {}              # no module argument: by call signature

    def __call__(self, *args):
        sig = (torch.is_grad_enabled(),) + tuple(
            _meta(a) if isinstance(a, torch.Tensor) else None if isinstance(a, nn.Module) else a
            for a in args)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        modules = [a for a in args if isinstance(a, nn.Module)]
        if not modules:
            graph = self.plain.get(sig)
            if graph is None:
                graph = self.plain[sig] = self._build(args, tensors, len(tensors), [])[1]
            return graph(*tensors)
        (module,) = modules
        per_module = self.bound.setdefault(module, {})
        b = per_module.get(sig)
        state = None if b is None else b.inputs()
        if state is None:
            b = per_module[sig] = self._bind(module, sig, args, tensors)
            state = b.tensors
        return b.graph(*state, *tensors)

    def _bind(self, module: nn.Module, sig: tuple, args: tuple, tensors: list) -> _Bound:
        where = _tensors_of(module)
        state = [d[n] for d, n in where]
        key = (tuple(_meta(t) for t in state), sig)
        built = self.graphs.get(key)
        if built is None:
            built = self.graphs[key] = self._build(args, state + tensors, len(tensors), where)
        return _Bound([where[i] for i in built[0]], built[1])

    def _build(self, args: tuple, inputs: list[torch.Tensor], n_args: int, where: list[tuple[dict, str]]
               ) -> tuple[list[int], Callable]:
        """Trace fn with the module's tensors (at `where`) and the tensor arguments as graph inputs
        (make_fx in real mode knows a tensor by its identity: the module's own parameters are those
        inputs), drop the module tensors it does not read, build the rest; -> (module tensors read,
        graph). With a dim marked `dynamic` the trace runs on fake tensors with that dim symbolic."""
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        from torch.fx.experimental.proxy_tensor import make_fx
        symbolic = any(_dims(t) for t in inputs)
        try:
            if symbolic:
                gm = _trace_symbolic(self.fn, args, inputs, where)
            else:
                gm = make_fx(lambda *_: self.fn(*args))(*inputs)
            n_state = len(inputs) - n_args
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            keep = [i for i, n in enumerate(placeholders) if i >= n_state or n.users]
            for i, n in enumerate(placeholders):
                if i not in keep:
                    gm.graph.erase_node(n)
            gm.recompile()
            # no size asserts: a graph is only called with the metadata it is keyed by (~0.7 us an input)
            examples = ([n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"] if symbolic
                        else _fake([inputs[i] for i in keep]))
            with inductor_config.patch(size_asserts=False, alignment_asserts=False):
                return [i for i in keep if i < n_state], compile_fx(gm, examples)
        except Exception as e:                              # noqa: BLE001  (re-raised, explained)
            raise KernelError(f"inductor could not build kernel {self.name} (a C++ compiler and the "
                              f"Python headers are needed at run time): {e}") from e


def _trace_symbolic(fn: Callable, args: tuple, inputs: list[torch.Tensor], where: list[tuple[dict, str]]):
    """make_fx of fn(*args) over fake copies of `inputs` whose `dynamic` dims are symbolic (one
    graph for every batch size, called directly: no dynamo guards, ~130 us a call on a block), the
    module's tensors at `where` swapped for their fakes while it traces."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    mode = FakeTensorMode(shape_env=ShapeEnv())
    fakes = {}
    for t in inputs:
        sizes = [DimDynamic.DYNAMIC if i in _dims(t) else DimDynamic.STATIC for i in range(t.dim())]
        fakes[id(t)] = mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))
    fake_args = tuple(fakes[id(a)] if isinstance(a, torch.Tensor) else a for a in args)
    real = [d[n] for d, n in where]
    try:
        for d, n in where:
            d[n] = fakes[id(d[n])]
        with mode:
            return make_fx(lambda *_: fn(*fake_args))(*[fakes[id(t)] for t in inputs])
    finally:
        for (d, n), t in zip(where, real):
            d[n] = t


def _fake(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The example inputs as fake tensors of a mode with a (static) ShapeEnv: inductor's FX graph
    cache refuses graphs without one ('No shape env'), so every fresh process would compile every
    graph again (~10 s of a packed model's first request)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    mode = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True)
    return [mode.from_tensor(t, static_shapes=True) for t in inputs]


def tracing() -> bool:
    """Whether the caller is being traced into a larger compiled graph (dynamo, or `kernel`'s own
    make_fx trace): a kernel then inlines its math instead of calling its own compiled function."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode
    return torch.compiler.is_compiling() or get_proxy_mode() is not None


def dynamic(t: torch.Tensor, *dims: int) -> torch.Tensor:
    """Mark `dims` of an activation `t` dynamic for `Kernel` calls (sizes > 1 only: size 1 stays
    specialised): its graph is traced with them symbolic and serves every size. Not for a module's
    tensors (their shapes key the graphs)."""
    if not hasattr(t, "_dynamo_dynamic_indices"):
        for d in dims:
            if t.shape[d] > 1:
                torch._dynamo.mark_dynamic(t, d)
    return t
