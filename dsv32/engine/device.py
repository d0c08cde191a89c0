"""`--device auto`: the device a command runs on when none is named (CUDA when present, else CPU)."""
from __future__ import annotations

AUTO = "auto"


def resolve_device(device: str = AUTO, cuda_available: bool | None = None) -> str:
    """"auto" -> "cuda" when torch sees a CUDA device, else "cpu"; any other name is returned as
    given. `cuda_available` overrides the probe (tests)."""
    if device != AUTO:
        return device
    if cuda_available is None:
        import torch
        cuda_available = torch.cuda.is_available()
    return "cuda" if cuda_available else "cpu"
