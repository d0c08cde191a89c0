"""Nothing one request does can end another: n > 1 forks at a full cache or a full running set wait
instead of failing the step, and a request whose logits processor, detokenisation, sampling or
forward raises ends with finish_reason "error" while every other request goes on unchanged; an
abort ends its own request's stream at once, whatever the engine is doing."""
import asyncio
import logging
import threading
import time

import pytest
import torch

from dsv32.chat import Tokenizer
from dsv32.engine.async_engine import AsyncLLM
from dsv32.engine.engine import BatchError, EngineConfig, LLMEngine
from dsv32.engine.sampler import Sampler
from dsv32.engine.sequence import SamplingParams, Sequence
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
        assert all(o.finish_reason == "length" and o.error is None for o in got[rid].outputs)
    assert len(got["fan"].outputs) == 3 and all(len(t) == 20 for t in tokens(got["fan"]))


def test_fork_never_runs_more_than_max_num_seqs(ckpt, model, tok):
    """n = 5 with max_num_seqs 2 (and a bystander): the children take seats as they free up."""
    reqs = [("by", prompt(30, 3), greedy(12)), ("fan", prompt(40, 4), seeded(6, n=5))]
    ref = drive(make(ckpt, model, tok, max_num_seqs=8), reqs)
    got = drive(make(ckpt, model, tok, max_num_seqs=2), reqs)
    assert len({tuple(t) for t in tokens(ref["fan"])}) > 1       # the seeds differ per child
    for rid in ("by", "fan"):
        assert tokens(got[rid]) == tokens(ref[rid])


# ---- per-sequence failures -------------------------------------------------------------------
class Explodes:
    """Logits processor that raises on its `at`-th call (one instance per request: no clone)."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, out: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            raise ValueError(f"grammar exploded at call {self.at}")
        return logits


@pytest.mark.parametrize("n", [1, 2])
def test_raising_logits_processor_ends_only_its_request(ckpt, model, tok, caplog, n):
    good = ("good", prompt(50, 6), greedy(8))
    alone = drive(make(ckpt, model, tok), [good])["good"]
    eng = make(ckpt, model, tok)
    with caplog.at_level(logging.ERROR, logger="dsv32.engine"):
        got = drive(eng, [("bad", prompt(20, 5), greedy(8, n=n, logits_processors=[Explodes(3)])), good])
    bad = got["bad"]
    assert bad.finished and len(bad.outputs) == n
    for o in bad.outputs:
        assert o.finish_reason == "error"
        assert "logits processor" in o.error and "ValueError: grammar exploded at call 3" in o.error
    assert sum(len(o.token_ids) for o in bad.outputs) == 2      # two calls went through
    assert got["good"].outputs[0].finish_reason == "length"
    assert tokens(got["good"]) == tokens(alone)
    records = [r for r in caplog.records if r.name == "dsv32.engine"]
    assert len(records) == 1 and "bad" in records[0].getMessage() and records[0].exc_info is not None


def test_failing_detokenizer_ends_only_its_request(ckpt, model, tok, monkeypatch):
    good = ("good", prompt(50, 6), greedy(8))
    alone = drive(make(ckpt, model, tok), [good])["good"]
    eng = make(ckpt, model, tok)
    eng.add_request("bad", prompt(20, 5), greedy(8))
    detok, calls = eng.requests["bad"].detoks[0], []

    def add(token_id: int) -> str:
        calls.append(token_id)
        if len(calls) == 2:
            raise UnicodeError("bytes from nowhere")
        return type(detok).add(detok, token_id)

    monkeypatch.setattr(detok, "add", add)
    got = drive(eng, [good])
    o = got["bad"].outputs[0]
    assert o.finish_reason == "error" and "detokenisation" in o.error and "bytes from nowhere" in o.error
    assert tokens(got["good"]) == tokens(alone) and got["good"].outputs[0].finish_reason == "length"


def test_sampler_redoes_a_failing_batch_row_by_row():
    """A row that makes the batched steps raise (here a logit_bias key that is no token id, which
    the engine would reject on add) fails alone; the seeded row draws what it draws alone."""
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    ok = lambda: Sequence("ok", [1, 2], SamplingParams(temperature=1.0, seed=3))
    bad = Sequence("bad", [1, 2], SamplingParams(logit_bias={"not a token": 1.0}))
    alone = Sampler(seed=0)(logits[:1], [ok()], 0)
    out = Sampler(seed=0)(logits, [ok(), bad], 0)
    assert list(out.failed) == [1] and out.failed[1].stage == "sampling"
    assert "ValueError" in str(out.failed[1])
    assert out.token_ids[0] == alone.token_ids[0] and not alone.failed


# ---- forward failures --------------------------------------------------------------------------
def flaky(eng, monkeypatch, fails) -> list:
    """Make the runner raise once, on the first batch for which `fails(batch)` holds."""
    real, raised = eng.runner.run, []

    def run(batch):
        if not raised and fails(batch):
            raised.append([s.request_id for s, _ in batch])
            raise RuntimeError("device lost")
        return real(batch)

    monkeypatch.setattr(eng.runner, "run", run)
    return raised


def test_failed_forward_ends_only_its_batch(ckpt, model, tok, monkeypatch):
    reqs = [(rid, prompt(30 + 10 * i, 20 + i), greedy(10)) for i, rid in enumerate("abc")]
    ref = drive(make(ckpt, model, tok), reqs + [("d", prompt(25, 30), greedy(10))])
    eng = make(ckpt, model, tok, max_num_seqs=2)                  # c waits while a and b run
    raised = flaky(eng, monkeypatch, lambda batch: any(s.num_output_tokens for s, _ in batch))
    for rid, p, sp in reqs:
        eng.add_request(rid, p, sp)
    eng.step()
    with pytest.raises(BatchError, match="model forward failed: RuntimeError: device lost") as info:
        eng.step()
    assert raised == [["a", "b"]]
    failed = {out.request_id: out for out in info.value.outputs}
    assert set(failed) == {"a", "b"} and all(out.finished for out in failed.values())
    assert all(o.finish_reason == "error" and "device lost" in o.error for out in failed.values() for o in out.outputs)
    assert set(eng.requests) == {"c"} and not eng.scheduler.running
    got = drive(eng, [("d", prompt(25, 30), greedy(10))])
    for rid in "cd":
        assert tokens(got[rid]) == tokens(ref[rid])


def test_async_engine_fails_only_the_failed_batch(ckpt, model, tok, monkeypatch):
    """Through AsyncLLM: the doomed request gets an "error" output, not an exception; the request
    waiting behind it (max_num_seqs 1) and a later one complete."""
    eng = make(ckpt, model, tok, max_num_seqs=1)
    raised = flaky(eng, monkeypatch, lambda batch: batch[0][0].request_id == "doomed" and "by" in eng.requests)
    llm = AsyncLLM(eng)

    async def final(rid, p, sp, started=None):
        last = None
        async for out in llm.generate(p, sp, rid):
            if started is not None:
                started.set()
            last = out
        return last

    async def main():
        started = asyncio.Event()
        doomed = asyncio.ensure_future(final("doomed", prompt(10, 40), greedy(100), started))
        await started.wait()
        by = await final("by", prompt(12, 41), greedy(6))
        return await doomed, by, await final("after", prompt(14, 42), greedy(6))

    try:
        doomed, by, after = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        llm.shutdown()
    assert raised == [["doomed"]]
    assert doomed.finished and doomed.outputs[0].finish_reason == "error" and "device lost" in doomed.outputs[0].error
    assert by.outputs[0].finish_reason == "length" and after.outputs[0].finish_reason == "length"
    assert eng.block_manager.usage == 0.0 and not eng.has_unfinished()


def test_async_abort_ends_the_stream_while_a_step_runs(ckpt, model, tok, monkeypatch):
    """abort() ends the request's generate() at once, not after the engine's step in progress (a
    first compile can hold a step for seconds, past a server's shutdown grace); the engine frees the
    request once that step is over."""
    eng = make(ckpt, model, tok)
    entered, release, real_step, calls = threading.Event(), threading.Event(), eng.step, []

    def step():
        calls.append(len(calls))
        if len(calls) == 2:                 # the step after the first output hangs until released
            entered.set()
            release.wait(30)
        return real_step()

    monkeypatch.setattr(eng, "step", step)
    llm = AsyncLLM(eng)

    async def main():
        agen = llm.generate(prompt(10, 50), greedy(50), "r")
        first = await agen.__anext__()
        await asyncio.to_thread(entered.wait, 30)
        await llm.abort("r")
        rest = [out async for out in agen]
        return first, rest, release.is_set()

    try:
        first, rest, released = asyncio.run(asyncio.wait_for(main(), 20))
        release.set()
        deadline = time.monotonic() + 20
        while eng.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        release.set()
        llm.shutdown()
    assert not first.finished and rest == [] and not released
    assert not eng.has_unfinished() and eng.block_manager.usage == 0.0
