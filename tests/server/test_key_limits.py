"""Limits per API key (issue 35): requests in flight and tokens per minute, over the limit a 429
with Retry-After and the OpenAI error body, while the other keys are served; the sliding window."""
import json
import time

import httpx
import openai
import pytest

from dsv32.server.errors import APIError
from dsv32.server.keys import ApiKey, Limits
from dsv32.server.limits import KeyLimiter

from .conftest import key_client, keyed_server

USER = [{"role": "user", "content": "Hi"}]
# carol has the server's default (--max-concurrent-per-key 1), dave a small token budget
KEYS = "carol: sk-carol\ndave: sk-dave tpm=40 max_concurrent=4\nbob: sk-bob max_concurrent=8\n"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_window_slides():
    clock = Clock()
    limiter = KeyLimiter(clock)
    key = ApiKey("k", b"s", Limits(tokens_per_minute=100))
    limiter.acquire(key)
    limiter.charge("k", 60)
    clock.now += 30.2
    limiter.charge("k", 50)               # 110 in the window: refused until the first 60 leave it
    with pytest.raises(APIError) as e:
        limiter.acquire(key)
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded" and e.value.type == "rate_limit_error"
    assert e.value.retry_after == 31      # the 60 tokens of second 1000 leave the window at 1061
    assert "'k' used 110 tokens" in e.value.message
    clock.now += 30.8                     # 1061.0
    assert limiter.used("k") == 50
    limiter.acquire(key)
    assert limiter.in_flight["k"] == 2
    limiter.release(key), limiter.release(key)
    assert limiter.in_flight == {}


def test_concurrency_slots():
    limiter = KeyLimiter(Clock())
    key, other = ApiKey("k", b"s", Limits(max_concurrent=2)), ApiKey("o", b"t", Limits(max_concurrent=1))
    limiter.acquire(key), limiter.acquire(key), limiter.acquire(other)
    with pytest.raises(APIError) as e:
        limiter.acquire(key)
    assert e.value.code == "concurrency_limit_exceeded" and e.value.retry_after is None
    limiter.release(key)
    limiter.acquire(key)


@pytest.fixture(scope="module")
def limited(server_ckpt, server_model, tmp_path_factory):
    s = keyed_server(tmp_path_factory.mktemp("limits"), server_ckpt, server_model, KEYS, "sk-bob",
                     dict(max_model_len=4096, max_num_seqs=8), max_concurrent_per_key=1)
    yield s
    s.stop()


def rate_limited(server, name: str, limit: str) -> float:
    return server.metrics().get(f"dsv32:requests_rate_limited_total[('key', '{name}'), ('limit', '{limit}')]", 0)


def test_concurrency_limit_while_another_key_is_served(limited):
    carol = key_client(limited, "sk-carol")
    long = dict(model="tiny", messages=USER, max_tokens=3000, stream=True, extra_body={"ignore_eos": True})
    before = rate_limited(limited, "carol", "concurrency_limit_exceeded")
    stream = carol.chat.completions.create(**long)
    chunks = iter(stream)
    next(chunks), next(chunks)                     # carol's one request runs
    for attempt in (lambda: carol.chat.completions.create(model="tiny", messages=USER, max_tokens=1),
                    lambda: carol.completions.create(model="tiny", prompt="x", max_tokens=1)):
        with pytest.raises(openai.RateLimitError) as e:
            attempt()
        err = e.value.body
        assert err["type"] == "rate_limit_error" and err["code"] == "concurrency_limit_exceeded", err
        assert "'carol' has 1 request(s) in flight (limit 1)" in err["message"]
        assert int(e.value.response.headers["retry-after"]) >= 1
    bob = key_client(limited, "sk-bob")
    assert bob.chat.completions.create(model="tiny", messages=USER, max_tokens=2).usage.completion_tokens == 2
    assert len(bob.models.list().data) == 3        # carol's other routes are not limited
    assert key_client(limited, "sk-carol").models.list().data
    stream.close()                                 # carol's slot comes back
    assert rate_limited(limited, "carol", "concurrency_limit_exceeded") == before + 2
    for _ in range(50):
        try:
            assert carol.chat.completions.create(model="tiny", messages=USER, max_tokens=1).choices
            break
        except openai.RateLimitError:              # the server sees the disconnect a moment later
            time.sleep(0.1)
    else:
        pytest.fail("carol's slot never came back")


def test_tokens_per_minute_while_another_key_is_served(limited):
    url = limited.url + "/v1/chat/completions"
    body = {"model": "tiny", "messages": USER, "max_tokens": 40, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url, json=body, headers={"Authorization": "Bearer sk-dave"}, timeout=60) as r:
        usage = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")][-1]["usage"]
    assert usage["completion_tokens"] == 40 and usage["total_tokens"] > 40
    dave = key_client(limited, "sk-dave")
    with pytest.raises(openai.RateLimitError) as e:
        dave.chat.completions.create(model="tiny", messages=USER, max_tokens=1)
    err = e.value.body
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    assert f"'dave' used {usage['total_tokens']} tokens in the last minute (limit 40)" in err["message"]
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 61
    with pytest.raises(openai.RateLimitError):     # completions share the budget
        dave.completions.create(model="tiny", prompt="x", max_tokens=1)
    bob = key_client(limited, "sk-bob")
    assert bob.completions.create(model="tiny", prompt="x", max_tokens=3).usage.completion_tokens == 3
    assert limited.state.limiter.used("bob") >= 3 and limited.state.limiter.used("dave") == usage["total_tokens"]
