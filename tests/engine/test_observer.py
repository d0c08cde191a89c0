"""The engine's step observer: passed at construction, it sees which tokens every forward computes
(and runs it with its model hooks) and every sampling, without changing a token."""
import pytest

from dsv32.engine.config import EngineConfig
from dsv32.engine.engine import LLMEngine
from dsv32.engine.observer import StepObserver
from dsv32.engine.sequence import SamplingParams
from dsv32.model.hooks import Hooks

from .test_engine import ckpt, greedy, make_engine, model, prompts_of, run  # noqa: F401


class Watch(StepObserver):
    """Records every forward's rows, the routing the model shows it, and every sampling."""

    wants_kept = True

    def __init__(self):
        self.forwards, self.routes, self.samples = [], [], []

    def forward(self, rows):
        self.forwards.append([(seq.request_id, seq.index, start, n) for seq, start, n in rows])
        batch = len(rows)
        return Hooks(route=lambda layer, view: self.routes.append((layer, batch, tuple(view.ids.shape))))

    def sampled(self, seqs, logits, out):
        assert logits.shape[0] == len(seqs) and len(out.kept) == len(seqs)
        self.samples += [((s.request_id, s.index), tok, kept is not None)
                         for s, tok, kept in zip(seqs, out.token_ids, out.kept)]


def test_the_observer_sees_every_forward_and_sampling(ckpt, model):  # noqa: F811
    prompts = prompts_of([5, 40, 90], seed=3)
    params = [greedy(6), SamplingParams(n=2, temperature=1.0, top_k=20, seed=1, max_tokens=5, ignore_eos=True),
              greedy(4)]
    ref = run(make_engine(ckpt, model), prompts, params)
    watch = Watch()
    eng = LLMEngine(EngineConfig(model=str(ckpt), max_model_len=512, max_num_batched_tokens=48), model=model,
                    observer=watch)
    got = run(eng, prompts, params)
    assert [[o.token_ids for o in r.outputs] for r in got] == [[o.token_ids for o in r.outputs] for r in ref]

    computed: dict = {}                     # every token but the last sampled has its key computed once
    for rows in watch.forwards:
        for rid, index, start, n in rows:
            computed.setdefault((rid, index), []).append((start, n))
    for i, (prompt, r) in enumerate(zip(prompts, got)):
        parent = sorted(computed[(f"r{i}", 0)])
        assert parent[0][0] == 0 and all(a + m == b for (a, m), (b, _) in zip(parent, parent[1:]))
        assert sum(m for _, m in parent) == len(prompt) + len(r.outputs[0].token_ids) - 1
    assert sorted(computed[("r1", 1)])[0][0] == len(prompts[1])     # the fork starts after the prompt

    moe = [i for i, b in enumerate(model.model.layers[: model.n_layers]) if hasattr(b.mlp, "gate")]
    assert len(watch.routes) == len(watch.forwards) * len(moe)
    assert all(layer in moe and shape[0] == batch and shape[-1] == model.config.num_experts_per_tok
               for layer, batch, shape in watch.routes)

    sampled = {}
    for key, tok, kept in watch.samples:
        assert kept
        sampled.setdefault(key, []).append(tok)
    assert sampled == {(f"r{i}", o.index): o.token_ids for i, r in enumerate(got) for o in r.outputs}


def test_an_observer_needs_speculation_off(ckpt, model):  # noqa: F811
    with pytest.raises(ValueError, match="num_speculative_tokens 0"):
        LLMEngine(EngineConfig(model=str(ckpt), num_speculative_tokens=1), model=model, observer=Watch())
