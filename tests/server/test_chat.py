"""/v1/chat/completions through the official openai client: fields, thinking, tools, streaming."""
import asyncio
import json

import httpx
import pytest

from dsv32.chat import render_tool_calls

USER = [{"role": "user", "content": "Hello!"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
CALL = render_tool_calls([{"type": "function", "function": {"name": "get_weather",
                                                             "arguments": {"city": "Paris", "days": 3}}}])


def raw_stream(server, body: dict) -> list[str]:
    """The data: payloads of a streamed answer, [DONE] included."""
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def test_basic_answer_shape(client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "tiny"
    assert r.system_fingerprint and r.created > 0
    (c,) = r.choices
    assert c.index == 0 and c.finish_reason == "length" and c.message.role == "assistant"
    assert isinstance(c.message.content, str) and c.logprobs is None
    u = r.usage
    assert u.completion_tokens == 4 and u.total_tokens == u.prompt_tokens + 4
    extra = u.model_extra
    assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens == extra["prompt_cache_hit_tokens"]
    assert u.completion_tokens_details.reasoning_tokens == 0


def test_max_completion_tokens_and_chat_path(server, client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_completion_tokens=2)
    assert r.usage.completion_tokens == 2
    body = {"messages": USER, "max_tokens": 1}
    for path in ("/chat/completions", "/beta/chat/completions"):
        assert httpx.post(server.url + path, json=body, timeout=60).json()["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("how", ["model", "thinking", "kwargs"])
def test_thinking_switch(client, how):
    kw = {"model": "tiny", "extra_body": {"x_force": "I think so.</think>Yes."}}
    if how == "model":
        kw["model"] = "deepseek-reasoner"
    elif how == "thinking":
        kw["extra_body"]["thinking"] = {"type": "enabled"}
    else:
        kw["extra_body"]["chat_template_kwargs"] = {"thinking": True}
    r = client.chat.completions.create(messages=USER, max_tokens=20, **kw)
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == "I think so." and msg.content == "Yes."
    assert r.choices[0].finish_reason == "stop"
    assert r.model == kw["model"]
    # tokens before </think> are reasoning tokens
    assert r.usage.completion_tokens_details.reasoning_tokens == 4


def test_thinking_off(client):
    for extra in ({}, {"thinking": {"type": "disabled"}}, {"chat_template_kwargs": {"thinking": False}}):
        model = "deepseek-reasoner" if extra else "deepseek-chat"
        r = client.chat.completions.create(model=model, messages=USER, max_tokens=20,
                                           extra_body={"x_force": "Plain answer.", **extra})
        msg = r.choices[0].message
        assert msg.content == "Plain answer." and msg.model_extra.get("reasoning_content") is None
        assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_stream_chunk_shapes(server):
    body = {"model": "deepseek-reasoner", "messages": USER, "max_tokens": 20,
            "stream_options": {"include_usage": True}, "x_force": "Hmm, well.</think>Fine answer."}
    data = raw_stream(server, body)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "deepseek-reasoner" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert usage["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    body_chunks = chunks[:-1]
    assert all(c["usage"] is None for c in body_chunks)
    kinds = [k for c in body_chunks for k in c["choices"][0]["delta"] if k in ("reasoning_content", "content")]
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in body_chunks)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in body_chunks)
    assert reasoning == "Hmm, well." and content == "Fine answer."
    assert kinds.index("content") > max(i for i, k in enumerate(kinds) if k == "reasoning_content")
    assert body_chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in body_chunks[:-1])


def test_stream_without_usage(server):
    chunks = [json.loads(d) for d in raw_stream(server, {"messages": USER, "max_tokens": 3})[:-1]]
    assert all("usage" not in c for c in chunks) and all(c["choices"] for c in chunks)


def test_tool_calls_streamed_argument_by_argument(client):
    stream = client.chat.completions.create(
        model="deepseek-reasoner", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
        stream=True, max_tokens=100, extra_body={"x_force": "Need the tool.</think>Let me check." + CALL})
    calls, fragments, finish, content = {}, 0, None, ""
    for chunk in stream:
        ch = chunk.choices[0]
        content += ch.delta.content or ""
        for tc in ch.delta.tool_calls or []:
            if tc.id is not None:
                assert tc.function.name == "get_weather" and tc.type == "function"
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "args": tc.function.arguments or ""}
            else:
                calls[tc.index]["args"] += tc.function.arguments
                fragments += 1
        finish = ch.finish_reason or finish
    assert finish == "tool_calls" and content == "Let me check."
    assert list(calls) == [0] and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["args"]) == {"city": "Paris", "days": 3}
    assert fragments >= 2   # arguments arrive in pieces, not as one buffered string


def test_tool_calls_message_and_round_trip(client):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="deepseek-chat", messages=msgs, tools=[WEATHER], tool_choice="auto",
                                       max_tokens=100, extra_body={"x_force": CALL.lstrip()})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
    # send the call and its result back: the conversation continues
    msgs += [c.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    r2 = client.chat.completions.create(model="deepseek-chat", messages=msgs, tools=[WEATHER], max_tokens=20,
                                        extra_body={"x_force": "It is 21 degrees."})
    assert r2.choices[0].message.content == "It is 21 degrees."


def test_tool_choice_none_leaves_tools_out(client):
    r1 = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], tool_choice="none",
                                        max_tokens=1)
    r2 = client.chat.completions.create(model="tiny", messages=USER, max_tokens=1)
    assert r1.usage.prompt_tokens == r2.usage.prompt_tokens


def test_n_choices(client, server):
    r = client.chat.completions.create(model="tiny", messages=USER, n=3, max_tokens=3, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 9
    chunks = [json.loads(d) for d in raw_stream(server, {"messages": USER, "n": 2, "max_tokens": 3})[:-1]]
    firsts = [c["choices"][0] for c in chunks if c["choices"][0]["delta"].get("role")]
    assert sorted(c["index"] for c in firsts) == [0, 1]
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1]


def test_seed_reproducible(client):
    kw = dict(model="tiny", messages=USER, max_tokens=6, temperature=1.5, seed=1234)
    a, b = (client.chat.completions.create(**kw) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    g1, g2 = (client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0)
              for _ in range(2))
    assert g1.choices[0].message.content == g2.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(client, stream):
    kw = dict(model="tiny", messages=USER, max_tokens=30, stop=["STOP", "never"],
              extra_body={"x_force": "alpha beta STOP gamma delta"})
    if not stream:
        c = client.chat.completions.create(**kw).choices[0]
        assert c.message.content == "alpha beta " and c.finish_reason == "stop"
        return
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert text == "alpha beta " and finish == "stop"


def test_logprobs(client, tokenizer):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 3
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
    r0 = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, logprobs=True)
    assert all(e.top_logprobs == [] for e in r0.choices[0].logprobs.content)
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, logprobs=True,
                                                 top_logprobs=1, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(streamed) == 3 and all(len(e.top_logprobs) == 1 for e in streamed)


def test_logit_bias_forces_a_token(client, tokenizer):
    tid = tokenizer.encode(" banana")[0]
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, logit_bias={str(tid): 100})
    assert r.choices[0].message.content == tokenizer.decode([tid] * 3)


def test_penalties_accepted(client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, presence_penalty=1.5,
                                       frequency_penalty=-1.0, temperature=0.7, top_p=0.9)
    assert r.usage.completion_tokens == 3


def test_prefix_completion(client):
    msgs = [*USER, {"role": "assistant", "content": "The answer is", "prefix": True}]
    r = client.chat.completions.create(model="deepseek-chat", messages=msgs, max_tokens=10,
                                       extra_body={"x_force": " forty-two."})
    assert r.choices[0].message.content == " forty-two."
    # in thinking mode a prefix without content continues the reasoning
    msgs = [*USER, {"role": "assistant", "content": "", "reasoning_content": "First,", "prefix": True}]
    r = client.chat.completions.create(model="deepseek-reasoner", messages=msgs, max_tokens=10,
                                       extra_body={"x_force": " think.</think>Done."})
    m = r.choices[0].message
    assert m.model_extra["reasoning_content"] == " think." and m.content == "Done."


def test_prompt_cache_hits(client):
    long = [{"role": "system", "content": "You are helpful. " * 40}, *USER]
    client.chat.completions.create(model="tiny", messages=long, max_tokens=1)
    r = client.chat.completions.create(model="tiny", messages=long, max_tokens=1)
    extra = r.usage.model_extra
    assert extra["prompt_cache_hit_tokens"] >= 64 and extra["prompt_cache_hit_tokens"] % 64 == 0
    assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == r.usage.prompt_tokens


def test_async_client_streams_concurrently(server):
    async def main():
        client = server.async_client()

        async def one(i):
            text = ""
            stream = await client.chat.completions.create(model="tiny", messages=USER, max_tokens=20, stream=True,
                                                          extra_body={"x_force": f"answer {i}"})
            async for chunk in stream:
                text += chunk.choices[0].delta.content or ""
            return text

        results = await asyncio.gather(*(one(i) for i in range(4)))
        r = await client.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
        await client.close()
        return results, r

    results, r = asyncio.run(main())
    assert results == [f"answer {i}" for i in range(4)] and r.usage.completion_tokens == 2


def test_models(client):
    ids = {m.id: m for m in client.models.list()}
    assert set(ids) == {"tiny", "deepseek-chat", "deepseek-reasoner"}
    assert ids["deepseek-reasoner"].model_extra["thinking"] is True
    assert ids["deepseek-chat"].model_extra["thinking"] is False


def test_keepalive_comments_are_ignored_by_clients(server, client, monkeypatch):
    monkeypatch.setattr(server.state.cfg, "sse_keepalive", 0.005)
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": USER, "max_tokens": 4, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert any(line.startswith(": keep-alive") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4
    done = list(client.completions.create(model="tiny", prompt="x", max_tokens=3, stream=True))
    assert done[-1].choices[0].finish_reason == "length"
