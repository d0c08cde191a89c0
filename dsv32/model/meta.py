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
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}    # id -> (old, new): the old kept alive
    cpu = torch.device(device).type == "cpu"

    def empty(t: torch.Tensor) -> torch.Tensor:
        e = memory.empty(t.shape, t.dtype) if cpu else torch.empty(t.shape, dtype=t.dtype, device=device)
        return nn.Parameter(e, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else e
    for m in model.modules():
        for tensors in (m._parameters, m._buffers):
            for k, t in tensors.items():
                if t is None:
                    continue
                if id(t) not in made:
                    made[id(t)] = (t, empty(t))
                tensors[k] = made[id(t)][1]
