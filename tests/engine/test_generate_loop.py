"""One "run until done" loop: `LLMEngine.generate` / `steps`, shared by `LLM`, the CLI, GRPO
rollouts and the recipe's evaluation."""
import io

import pytest

from dsv32.chat import Tokenizer
from dsv32.cli import main
from dsv32.engine.engine import LLMEngine
from dsv32.engine.llm import LLM

from .test_engine import ckpt, greedy, make_engine, model, prompts_of, run  # noqa: F401


def test_generate_equals_stepping_by_hand(ckpt, model):  # noqa: F811
    prompts = prompts_of([4, 30, 70], seed=5)
    params = [greedy(5), greedy(3), greedy(7)]
    ref = run(make_engine(ckpt, model), prompts, params)
    eng, seen = make_engine(ckpt, model), []
    got = eng.generate(prompts, params, on_finished=lambda out: seen.append(out.request_id))
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    assert sorted(seen) == sorted(o.request_id for o in got) and not eng.has_unfinished()
    with pytest.raises(ValueError, match="params: 1 SamplingParams for 3 prompts"):
        eng.generate(prompts, params[:1])


@pytest.fixture
def loops(monkeypatch):
    """Counts the runs of the shared loop."""
    real, count = LLMEngine.steps, []

    def steps(self):
        count.append(1)
        yield from real(self)

    monkeypatch.setattr(LLMEngine, "steps", steps)
    return count


def test_every_caller_runs_the_shared_loop(ckpt, model, loops, monkeypatch, capsys):  # noqa: F811
    from dsv32.train import evaluate as evaluation
    from dsv32.train import grpo as G
    from dsv32.train.evaluate import evaluate_in_memory

    with LLM(model=str(ckpt), max_model_len=256) as llm:
        llm.generate(["Hello"], greedy(2), use_tqdm=False)
    assert len(loops) == 1
    flags = ["--model", str(ckpt), "--max-tokens", "2", "--max-model-len", "256"]
    assert main(["generate", "--prompt", "Hi", *flags]) == 0
    assert len(loops) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/exit\n"))
    assert main(["chat", *flags]) == 0
    assert len(loops) == 3
    tok = Tokenizer.load()
    G.rollout(G.make_engine(model, tok, max_seqs=4), [[0] + list(range(20, 30))],
              G.GRPOConfig(group_size=2, max_tokens=2), seed=0)
    assert len(loops) == 4
    monkeypatch.setattr(evaluation, "evaluate", lambda generate_batch, **kw: generate_batch(["Hi"], ["chat"]))
    assert len(evaluate_in_memory(model, tok, n=1)) == 1
    assert len(loops) == 5


def test_llm_without_a_model_loads_the_bundled_one_on_the_auto_device(ckpt, monkeypatch):  # noqa: F811
    from dsv32.engine import config as config_module, llm as llm_module
    asked = []
    monkeypatch.setattr(llm_module, "default_model", lambda: asked.append(1) or ckpt)
    monkeypatch.setattr(config_module, "resolve_device", lambda d: asked.append(d) or "cpu")
    with LLM(max_model_len=256) as llm:
        assert llm.engine.cfg.model == str(ckpt) and llm.engine.cfg.device == "cpu"
    assert asked == [1, "auto"]
