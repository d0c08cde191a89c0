"""Modules built on the meta device (load_model's build) given real storage without torch's Python
decompositions: torch's empty_like of a meta tensor (Module.to_empty) runs one, which imports dynamo
(~100 MB of RSS in a process that never compiles). On the CPU large tensors take memory advised
for huge pages (memory.py)."""
from __future__ import annotations

import torch
from torch import nn

from . import memory


def to_empty(model: nn.Module, device) -> None:
    """`model.to_empty(device=device)`: each parameter and buffer replaced by empty storage (a
    tensor tied between modules by one new tensor)."""
    olds: dict[int, torch.Tensor] = {}                          # id -> tensor, kept alive meanwhile
    for m in model.modules():
        for tensors in (m._parameters, m._buffers):
            for t in tensors.values():
                if t is not None:
                    olds.setdefault(id(t), t)
    specs = [(tuple(t.shape), t.dtype) for t in olds.values()]
    if torch.device(device).type == "cpu":
        news = memory.empty_all(specs)
    else:
        news = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
    made = {i: nn.Parameter(e, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else e
            for (i, t), e in zip(olds.items(), news)}
    for m in model.modules():
        for tensors in (m._parameters, m._buffers):
            for k, t in tensors.items():
                if t is not None:
                    tensors[k] = made[id(t)]
