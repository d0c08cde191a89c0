"""Nothing one request does can end another: n > 1 forks at a full cache or a full running set wait
instead of failing the step."""

import pytest
import torch

from dsv32.chat import Tokenizer
from dsv32.engine.engine import EngineConfig, LLMEngine
from dsv32.engine.sequence import SamplingParams
from dsv32.model.checkpoint import load_model
from dsv32.model.init_tiny import init_tiny

VOCAB = 2048


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("iso_tiny"), seed=5, layers=1, hidden=64, shards=1, vocab=VOCAB)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt, progress=False)


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.load(ckpt)


def make(ckpt, model, tok, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(ckpt), **{"max_model_len": 128, **kw}), model=model, tokenizer=tok)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True, **kw)


def seeded(n_tokens: int, **kw) -> SamplingParams:
    # top_k keeps the draws away from near-ties, which a recomputation's rounding could flip
    return SamplingParams(temperature=1.0, top_k=20, seed=11, max_tokens=n_tokens, ignore_eos=True, **kw)


def drive(eng: LLMEngine, requests=(), on_step=None) -> dict:
    """Add (request id, prompt, params) and step to the end, checking the running bound at every
    step; returns request id -> final output."""
    for rid, p, sp in requests:
        eng.add_request(rid, p, sp)
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        assert len(eng.scheduler.running) <= eng.scheduler.max_num_seqs
        if on_step is not None:
            on_step(eng)
    assert eng.block_manager.usage == 0.0
    return done


def tokens(out) -> list[list[int]]:
    return [o.token_ids for o in out.outputs]


# ---- n > 1 forks -----------------------------------------------------------------------------
@pytest.mark.parametrize("params", [greedy(20, n=3), seeded(20, n=3)], ids=["greedy", "seeded"])
def test_fork_at_a_full_cache_waits_and_gives_the_same_outputs(ckpt, model, tok, params):
    """3 blocks: the bystander (60 tokens) and the parent (70) fill them at the parent's prefill, so
    no block is free for the children's copy of its partly written last block."""
    reqs = [("by", prompt(60, 1), greedy(30)), ("fan", prompt(70, 2), params)]
    ref = drive(make(ckpt, model, tok), reqs)
    eng = make(ckpt, model, tok, num_blocks=3)
    deferred = []

    def watch(e):
        if not deferred:
            deferred.append([s.index for s in e.scheduler.waiting if s.request_id == "fan"])

    got = drive(eng, reqs, watch)
    assert deferred == [[1, 2]]                    # both children waited after the first step
    assert eng.scheduler.num_preemptions > 0
    for rid in ("by", "fan"):
        assert tokens(got[rid]) == tokens(ref[rid])
        assert all(o.finish_reason == "length" for o in got[rid].outputs)
    assert len(got["fan"].outputs) == 3 and all(len(t) == 20 for t in tokens(got["fan"]))


def test_fork_never_runs_more_than_max_num_seqs(ckpt, model, tok):
    """n = 5 with max_num_seqs 2 (and a bystander): the children take seats as they free up."""
    reqs = [("by", prompt(30, 3), greedy(12)), ("fan", prompt(40, 4), seeded(6, n=5))]
    ref = drive(make(ckpt, model, tok, max_num_seqs=8), reqs)
    got = drive(make(ckpt, model, tok, max_num_seqs=2), reqs)
    assert len({tuple(t) for t in tokens(ref["fan"])}) > 1       # the seeds differ per child
    for rid in ("by", "fan"):
        assert tokens(got[rid]) == tokens(ref[rid])
