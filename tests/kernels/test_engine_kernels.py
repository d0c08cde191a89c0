"""The engine with `kernels="torch"` (dsv32.kernels' sync-free paths, run eagerly on CPU) gives the
tokens of the eager reference engine: chunked prefills, decodes, n > 1, prefix hits, preemption."""
import pytest

from dsv32.engine.engine import EngineConfig, LLMEngine
from dsv32.engine.sequence import SamplingParams
from dsv32.model.checkpoint import load_model
from dsv32.model.init_tiny import init_tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("kernels_engine"), seed=2, layers=2, topk=16, kv_lora=128,
                     index_dim=128, index_heads=16, moe_inter=128, inter=256, fp8=True, mtp=0)


def run(ckpt, kernels: str, **kw) -> list[list[int]]:
    model = load_model(ckpt, fp8_storage=True)
    cfg = EngineConfig(model=str(ckpt), kernels=kernels, **{"max_model_len": 512, **kw})
    with LLMEngine(cfg, model=model) as engine:
        prompts = [list(range(100 + i, 100 + i + n)) for i, n in enumerate([70, 9, 40])]
        params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                  SamplingParams(n=2, temperature=1.0, top_k=5, seed=3, max_tokens=12, ignore_eos=True),
                  SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)]
        outs = engine.generate(prompts + prompts[:1], params + params[:1])
    return [o.token_ids for out in outs for o in out.outputs]


@pytest.mark.parametrize("kw", [{}, {"max_num_batched_tokens": 24, "num_blocks": 5, "max_model_len": 256}])
def test_fast_paths_give_the_reference_tokens(ckpt, kw):
    assert run(ckpt, "torch", **kw) == run(ckpt, "off", **kw)


def test_fast_paths_need_one_device(ckpt):
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        LLMEngine(EngineConfig(model=str(ckpt), kernels="torch", tensor_parallel_size=2))
