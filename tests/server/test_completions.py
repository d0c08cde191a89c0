"""/v1/completions and /beta/completions: plain, FIM, echo, logprobs, batches, token ids, streaming."""
import httpx
import openai
import pytest


def test_plain(client):
    r = client.completions.create(model="tiny", prompt="def fib(n):", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    (c,) = r.choices
    assert c.finish_reason == "length" and isinstance(c.text, str)
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens == 1 + 4   # BOS + "def fib(n):"


def test_default_max_tokens_is_16(client):
    assert client.completions.create(model="tiny", prompt="x", temperature=0).usage.completion_tokens == 16


def test_fim_on_beta(server, tokenizer):
    base = openai.OpenAI(base_url=server.url + "/beta", api_key="x", max_retries=0)
    r = base.completions.create(model="deepseek-chat", prompt="def add(a, b):\n", suffix="\n    return c",
                                max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == len(tokenizer.encode_fim("def add(a, b):\n", "\n    return c"))
    assert r.choices[0].text and r.model == "deepseek-chat"


def test_echo_and_logprobs(client):
    r = client.completions.create(model="tiny", prompt="Hello world", max_tokens=3, echo=True, logprobs=2,
                                  temperature=0)
    c = r.choices[0]
    assert c.text.startswith("Hello world")
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(v is not None for v in lp.token_logprobs)   # "Hello" follows BOS: it has one too
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs[-3:])
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == sorted(lp.text_offset)


def test_echoed_prompt_logprobs_match_generation(client, tokenizer):
    """The logprob of an echoed prompt token equals the one the model gave it when it generated it."""
    ids = tokenizer.encode("Hello world")
    gen = client.completions.create(model="tiny", prompt=ids, max_tokens=1, logprobs=1, temperature=0)
    token, logprob = gen.choices[0].logprobs.tokens[0], gen.choices[0].logprobs.token_logprobs[0]
    new_id = tokenizer.encode(gen.choices[0].text)
    r = client.completions.create(model="tiny", prompt=ids + new_id, max_tokens=1, echo=True, logprobs=1,
                                  temperature=0)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None                # the first token of a token-id prompt has no context
    assert all(v is not None for v in lp.token_logprobs[1:])
    assert lp.tokens[len(ids)] == token and abs(lp.token_logprobs[len(ids)] - logprob) < 1e-3


def test_batch_and_token_ids(client, tokenizer):
    r = client.completions.create(model="tiny", prompt=["one", "two"], n=2, max_tokens=2, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3] and r.usage.completion_tokens == 8
    ids = tokenizer.encode("Hello world")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=2, echo=True)
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].text.startswith("Hello world")


@pytest.mark.parametrize("n_prompts", [1, 2])
def test_stream(client, n_prompts):
    prompt = "Stream me" if n_prompts == 1 else ["a", "b"]
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=3, stream=True, echo=True,
                                            stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3 * n_prompts
    finishes = [ch.index for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(finishes) == list(range(n_prompts))
    if n_prompts == 1:
        assert "".join(ch.text for c in chunks for ch in c.choices).startswith("Stream me")


def test_stream_stop_and_logprobs(server):
    body = {"prompt": "x", "max_tokens": 4, "stream": True, "logprobs": 1, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    tokens = [t for c in chunks for ch in c["choices"] if ch["logprobs"] for t in ch["logprobs"]["tokens"]]
    assert len(tokens) == 4


def test_completion_errors(server):
    post = lambda body: httpx.post(server.url + "/v1/completions", json=body, timeout=30)  # noqa: E731
    assert post({"prompt": []}).status_code == 400
    assert post({"prompt": "x", "logprobs": 21}).status_code == 422
    assert post({"prompt": [[1, 2], []]}).status_code == 400
    assert post({"prompt": [999999999]}).status_code == 400
    assert post({"prompt": [1, 2], "suffix": "x"}).status_code == 400
    assert post({"prompt": "x", "max_tokens": 100000}).json()["error"]["code"] == "context_length_exceeded"
