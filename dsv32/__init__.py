"""dsv32: DeepSeek-V3.2 in PyTorch."""


def load_model(path, dtype=None, device="cpu", fp8_storage=False, **kwargs):
    """Load a DeepSeek-V3.2 checkpoint directory into an eval-mode `nn.Module` (see model.checkpoint)."""
    import torch

    from .model.checkpoint import load_model as _load_model
    return _load_model(path, dtype=torch.float32 if dtype is None else dtype, device=device,
                       fp8_storage=fp8_storage, **kwargs)


def __getattr__(name):
    """`from dsv32 import LLM, SamplingParams, AsyncLLM, EngineConfig` without importing torch up front."""
    if name == "LLM":
        from .engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from .engine.sequence import SamplingParams
        return SamplingParams
    if name in ("AsyncLLM",):
        from .engine.async_engine import AsyncLLM
        return AsyncLLM
    if name == "EngineConfig":
        from .engine.config import EngineConfig
        return EngineConfig
    if name == "LLMEngine":
        from .engine.engine import LLMEngine
        return LLMEngine
    raise AttributeError(f"module 'dsv32' has no attribute {name!r}")
