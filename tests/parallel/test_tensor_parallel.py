"""Tensor and expert parallelism on CPU with gloo: same greedy tokens as one process."""
import os
import signal
import time

import pytest

from dsv32.engine.llm import LLM
from dsv32.engine.sequence import SamplingParams
from dsv32.model.init_tiny import init_tiny

from ..engine.test_spec import OracleDrafts

PROMPTS = [[5, 6, 7, 8, 9] * 5, list(range(100, 190))]       # the second is longer than index_topk


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    dims = dict(layers=2, topk=16)
    return {"bf16": init_tiny(tmp_path_factory.mktemp("tp_bf16"), seed=2, **dims),
            "fp8": init_tiny(tmp_path_factory.mktemp("tp_fp8"), seed=2, fp8=True, **dims)}


def generate(path, setup=None, **kw):
    llm = LLM(model=str(path), max_model_len=256, max_num_seqs=4, **kw)
    try:
        if setup is not None:
            setup(llm)
        sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
        return [o.outputs[0] for o in llm.generate(PROMPTS, sp, use_tqdm=False)], llm.engine.metrics()
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
@pytest.mark.parametrize("ep", [False, True])
def test_tp2_equals_single_process(ckpts, kind, ep):
    single, _ = generate(ckpts[kind])
    tp, _ = generate(ckpts[kind], tensor_parallel_size=2, enable_expert_parallel=ep)
    same(single, tp)


def same(single, other):
    for a, b in zip(single, other):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_tp2_with_mtp_speculation_equals_single_process(ckpts):
    """Every rank runs the MTP layer (its cache layer stays in step); drafts made right and wrong
    on rank 0 (an oracle, as the random model's own drafts are nearly always wrong) leave the
    tokens and logprobs of plain single-process decoding."""
    single, _ = generate(ckpts["fp8"])
    oracle = OracleDrafts({tuple(p): o.token_ids for p, o in zip(PROMPTS, single)})
    tp, m = generate(ckpts["fp8"], lambda llm: oracle.install(llm.engine.speculator),
                     tensor_parallel_size=2, num_speculative_tokens=1)
    same(single, tp)
    assert 0 < m["spec_accepted_tokens"] < m["spec_draft_tokens"]


def test_a_dying_worker_stops_the_group_with_a_clear_error(ckpts):
    llm = LLM(model=str(ckpts["bf16"]), max_model_len=256, tensor_parallel_size=2)
    worker = llm.engine.executor.group.workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="tensor-parallel group failed: rank 1"):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4), use_tqdm=False)
    assert time.monotonic() - t0 < 60
    llm.engine.shutdown()


def test_indivisible_shapes_are_rejected(tmp_path):
    path = init_tiny(tmp_path / "odd", seed=0, layers=1, heads=3, hidden=96)
    with pytest.raises(ValueError, match="num_attention_heads"):
        LLM(model=str(path), max_model_len=128, tensor_parallel_size=2)
