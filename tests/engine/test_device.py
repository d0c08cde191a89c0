"""`--device auto`: CUDA when torch sees a device, else CPU; other names pass through."""
import torch

from dsv32.engine.device import resolve_device


def test_resolve_device():
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu", cuda_available=True) == "cpu"
    assert resolve_device() == ("cuda" if torch.cuda.is_available() else "cpu")
