"""MTP speculative decoding: the same tokens as plain decoding, drafts from the MTP layer."""
import pytest
import torch

from dsv32.engine.engine import EngineConfig, LLMEngine
from dsv32.engine.sequence import SamplingParams
from dsv32.engine.speculative import MTPSpeculator
from dsv32.model.init_tiny import init_tiny

from .test_engine import ckpt, greedy, make_engine, model, prompts_of, run  # noqa: F401


class OracleDrafts:
    """After the MTP layer drafts, replace each draft by the reference run's next token (right) or
    by another token (wrong), alternating, so both the accept and the reject path run."""

    def __init__(self, reference: dict[tuple[int, ...], list[int]]):
        self.reference, self.calls = reference, 0

    def install(self, spec: MTPSpeculator) -> None:
        """Run after every `spec.propose()`, on the sequences of the forwards it drafted for."""
        propose = spec.propose

        def patched():
            seqs = [s for group, _ in spec.forwards for s, _ in group]
            propose()
            self(spec, seqs)
        spec.propose = patched

    def __call__(self, spec: MTPSpeculator, seqs) -> None:
        for seq in seqs:
            if spec.draft_of(seq) is None:
                continue
            ref = self.reference[tuple(seq.token_ids[: seq.num_prompt_tokens])]
            at = seq.num_output_tokens
            if at < len(ref):
                self.calls += 1
                spec.drafts[seq.seq_id] = ref[at] if self.calls % 3 else (ref[at] + 1) % 1000 + 2


def spec_run(ckpt, model, prompts, params, oracle=None, **kw):
    eng = make_engine(ckpt, model, num_speculative_tokens=1, **kw)
    if oracle is not None:
        oracle.install(eng.speculator)
    return run(eng, prompts, params), eng


def same(a, b, tol=1e-3):
    for x, y in zip(a, b):
        for o, p in zip(x.outputs, y.outputs):
            assert o.token_ids == p.token_ids and o.text == p.text and o.finish_reason == p.finish_reason
            for u, v in zip(o.logprobs or [], p.logprobs or []):
                assert abs(u.logprob - v.logprob) < tol


@pytest.mark.parametrize("kw", [{}, {"max_num_batched_tokens": 37, "num_blocks": 8, "max_model_len": 256},
                                {"kv_cache_dtype": "bfloat16"}])
def test_speculation_gives_the_same_tokens(ckpt, model, kw):
    """Greedy and seeded sampling, prompts longer than index_topk; then chunked prefill with
    preemption: accepted and rejected drafts alike leave tokens, logprobs and texts unchanged."""
    prompts = prompts_of([3, 100, 100, 100], seed=11)
    # top_k: a random model's distribution is near-uniform over 129K tokens, where a 1e-7 change in
    # the cumulative sum (batched verify vs single-token forward kernels) moves a draw to the next id
    sampled = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=7, max_tokens=40,
                             ignore_eos=True, logprobs=1)
    params = [greedy(40), greedy(40), sampled, greedy(40, stop_token_ids=[5])]
    plain = make_engine(ckpt, model, **kw)
    ref = run(plain, prompts, params)
    oracle = OracleDrafts({tuple(p): r.outputs[0].token_ids for p, r in zip(prompts, ref)})
    got, eng = spec_run(ckpt, model, prompts, params, oracle, **kw)
    same(ref, got)
    n = model.config.num_hidden_layers              # the MTP layer's pools only where it drafts
    assert (plain.executor.cache.n_layers, eng.executor.cache.n_layers) == (n, n + 1)
    s = eng.metrics()
    assert 0 < s["spec_accepted_tokens"] < s["spec_draft_tokens"]
    assert s["kv_cache_usage_perc"] == 0.0
    if "num_blocks" in kw:
        assert eng.scheduler.num_preemptions > 0


def test_mtp_drafts_equal_a_full_forward_of_the_mtp_layer(ckpt, model):
    """The engine's draft after each step is the argmax of the MTP layer over the whole sequence."""
    prompt = prompts_of([70], seed=4)[0]
    eng = make_engine(ckpt, model, num_speculative_tokens=1)
    eng.add_request("r", prompt, greedy(12))
    seq = eng.requests["r"].seqs[0]
    checked = 0
    while eng.has_unfinished():
        eng.step()
        draft = eng.speculator.draft_of(seq)
        if draft is not None:
            ids = torch.tensor([seq.token_ids])
            with torch.no_grad():
                want = model.mtp_logits(model.hidden(ids), ids)[0, -1]
            assert draft == int(want.argmax()) or want.max() - want[draft] < 1e-4
            checked += 1
    assert checked >= 5


def test_n_and_stop_strings_with_speculation(ckpt, model):
    prompt = prompts_of([60], seed=2)[0]
    plain = run(make_engine(ckpt, model), [prompt], [greedy(20)])[0].outputs[0]
    stop = plain.text[3:6]
    params = [greedy(20, stop=[stop]), SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)]
    ref = run(make_engine(ckpt, model), [prompt, prompt], params)
    got, _ = spec_run(ckpt, model, [prompt, prompt], params,
                      OracleDrafts({tuple(prompt): plain.token_ids}))
    same(ref, got)


def test_speculation_needs_an_mtp_layer(ckpt, model, tmp_path):
    with pytest.raises(ValueError, match="0 or 1"):
        make_engine(ckpt, model, num_speculative_tokens=2)
    path = init_tiny(tmp_path / "no_mtp", seed=0, layers=1, mtp=0)
    with pytest.raises(ValueError, match="needs a model with an MTP layer"):
        LLMEngine(EngineConfig(model=str(path), num_speculative_tokens=1))
