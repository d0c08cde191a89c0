"""Nothing one request does can end another, over HTTP: an n > 1 request at a full cache with a
bystander, and requests whose logits processor or detokenisation fails (a 500 error body, or an
error event then [DONE] in a stream) while a concurrent request completes."""
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from dsv32.engine.engine import EngineConfig, LLMEngine
from dsv32.server import ServerConfig, create_app

from .conftest import RunningServer

USER = [{"role": "user", "content": "Hi"}]
POISON = 1000      # the token id the test tokenizer's detokenizers choke on


class Explodes:
    """Logits processor that raises on its `at`-th call."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, out: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            raise ValueError(f"grammar exploded at call {self.at}")
        return logits


def explode_hook(req) -> list:
    """`x_explode_at`: a logits processor raising on that call."""
    at = (req.model_extra or {}).get("x_explode_at")
    return [Explodes(at)] if isinstance(at, int) else []


class PoisonDetokenizer:
    """An incremental detokenizer that raises on POISON."""

    def __init__(self, inner):
        self.inner = inner

    def add(self, token_id: int) -> str:
        if token_id == POISON:
            raise UnicodeError(f"token {POISON} has no text")
        return self.inner.add(token_id)

    def flush(self) -> str:
        return self.inner.flush()


class PoisonTokenizer:
    """The real tokenizer, except that its detokenizers raise on POISON."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def detokenizer(self, skip_special_tokens: bool = False) -> PoisonDetokenizer:
        return PoisonDetokenizer(self.inner.detokenizer(skip_special_tokens=skip_special_tokens))


@pytest.fixture(scope="module")
def iso(server_ckpt, server_model, tokenizer):
    """Two cache blocks and two seats: an n = 3 fork never finds a free block for every child."""
    engine_cfg = EngineConfig(model=str(server_ckpt), max_model_len=128, max_num_seqs=2, num_blocks=2)
    cfg = ServerConfig(engine=engine_cfg, served_model_name="tiny")
    app = create_app(cfg, engine_factory=lambda: LLMEngine(engine_cfg, model=server_model,
                                                           tokenizer=PoisonTokenizer(tokenizer)),
                     extra_processors=explode_hook)
    s = RunningServer(app).wait_ready()
    yield s
    s.stop()


def together(*calls):
    """Run the calls concurrently (in order of submission); their results, or exceptions."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(c) for c in calls]
        return [f.exception() or f.result() for f in futures]


def bystander(client, max_tokens=30):
    return client.chat.completions.create(model="tiny", messages=USER, max_tokens=max_tokens, temperature=0,
                                          logit_bias={str(POISON): -100})


def stream_events(server, path, body) -> list[str]:
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def assert_error_body(body: dict, *words: str) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
    assert all(w in err["message"] for w in words), err["message"]


def test_n_greater_than_one_at_a_full_cache_with_a_bystander(iso):
    client = iso.client()
    by, fan = together(
        lambda: bystander(client),
        lambda: client.chat.completions.create(model="tiny", messages=USER, n=3, max_tokens=8, seed=3,
                                               logit_bias={str(POISON): -100}))
    assert not isinstance(fan, Exception) and not isinstance(by, Exception), (fan, by)
    assert [c.index for c in fan.choices] == [0, 1, 2] and fan.usage.completion_tokens == 24
    assert all(c.finish_reason == "length" for c in fan.choices)
    assert by.choices[0].finish_reason == "length" and by.usage.completion_tokens == 30


def test_failing_logits_processor_is_a_500_and_the_bystander_completes(iso):
    client = iso.client()
    by, doomed = together(
        lambda: bystander(client),
        lambda: client.chat.completions.create(model="tiny", messages=USER, max_tokens=20,
                                               extra_body={"x_explode_at": 3}))
    assert not isinstance(by, Exception) and by.choices[0].finish_reason == "length"
    assert isinstance(doomed, openai.InternalServerError) and doomed.status_code == 500
    assert_error_body(doomed.response.json(), "logits processor", "grammar exploded at call 3")


def test_failing_logits_processor_mid_stream_is_an_error_event(iso):
    client = iso.client()
    body = {"model": "tiny", "messages": USER, "max_tokens": 20, "x_explode_at": 3}
    by, events = together(lambda: bystander(client), lambda: stream_events(iso, "/v1/chat/completions", body))
    assert not isinstance(by, Exception) and by.choices[0].finish_reason == "length"
    assert events[-1] == "[DONE]"
    assert_error_body(json.loads(events[-2]), "grammar exploded at call 3")
    assert all("error" not in json.loads(e) for e in events[:-2])


def test_failing_detokenisation_in_text_completions(iso):
    """logit_bias makes the doomed completions sample POISON, which its detokenizer refuses."""
    client = iso.client()
    body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 10, "logit_bias": {str(POISON): 100}}
    by, doomed, events = together(
        lambda: bystander(client),
        lambda: client.completions.create(**body),
        lambda: stream_events(iso, "/v1/completions", body))
    assert not isinstance(by, Exception) and by.choices[0].finish_reason == "length"
    assert isinstance(doomed, openai.InternalServerError)
    assert_error_body(doomed.response.json(), "detokenisation", f"token {POISON} has no text")
    assert events[-1] == "[DONE]"
    assert_error_body(json.loads(events[-2]), f"token {POISON} has no text")
    after = client.completions.create(model="tiny", prompt="Once upon", max_tokens=4,
                                      logit_bias={str(POISON): -100})
    assert after.choices[0].finish_reason == "length"
