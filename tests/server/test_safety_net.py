"""The grammar safety net through the server and the official client: a model leaning towards a call
it may not make (no tools, another tool, a second call with parallel_tool_calls false) cannot make
it; `safety_net=False` (`--no-safety-net`) shows the raw behaviour; streamed equals non-streamed."""
import json

import pytest

from dsv32.chat import render_tool_calls

from .conftest import start_server

USER = [{"role": "user", "content": "What is 12 * 7?"}]


def tool(name: str, **props) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in props.items()}, "required": list(props)}}}


CALC, WEATHER = tool("calculator", expression="string"), tool("get_weather", city="string", date="string")
CALL = render_tool_calls([{"type": "function", "function": {"name": "calculator",
                                                            "arguments": {"expression": "12 * 7"}}}])
TWO = render_tool_calls([{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "1"}}},
                         {"type": "function", "function": {"name": "get_weather",
                                                           "arguments": {"city": "Oslo", "date": "2025-01-02"}}}])


@pytest.fixture(scope="module")
def raw_server(server_ckpt, server_model, tokenizer):
    s = start_server(server_ckpt, server_model, tokenizer, safety_net=False).wait_ready()
    yield s
    s.stop()


def ask(client, **kw):
    kw = {"model": "deepseek-chat", "messages": USER, "max_tokens": 60, "temperature": 0, **kw}
    return client.chat.completions.create(**kw).choices[0]


@pytest.mark.parametrize("model", ["deepseek-chat", "deepseek-reasoner"])
def test_no_tools_means_no_call(client, raw_server, model):
    lead = "12 times 7.</think>" if model == "deepseek-reasoner" else ""
    c = ask(client, model=model, extra_body={"x_prefer": lead + "Sure." + CALL})
    assert not c.message.tool_calls and "｜DSML｜" not in (c.message.content or "")
    assert c.finish_reason in ("stop", "length")
    raw = ask(raw_server.client(), model=model, extra_body={"x_prefer": lead + "Sure." + CALL})
    assert raw.message.tool_calls[0].function.name == "calculator"     # what the net prevents


def test_only_offered_tools_are_called(client, raw_server):
    c = ask(client, tools=[WEATHER], extra_body={"x_prefer": CALL.lstrip()})
    assert all(call.function.name == "get_weather" for call in c.message.tool_calls or [])
    raw = ask(raw_server.client(), tools=[WEATHER], extra_body={"x_prefer": CALL.lstrip()})
    assert raw.message.tool_calls[0].function.name == "calculator"


@pytest.mark.parametrize("parallel", [None, False])
def test_parallel_tool_calls(client, parallel):
    extra = {"x_prefer": TWO.lstrip()} | ({} if parallel is None else {"parallel_tool_calls": parallel})
    c = ask(client, tools=[CALC, WEATHER], max_tokens=120, extra_body=extra)
    names = [call.function.name for call in c.message.tool_calls]
    assert names == (["calculator", "get_weather"] if parallel is None else ["calculator"])
    assert json.loads(c.message.tool_calls[0].function.arguments) == {"expression": "1"}


@pytest.mark.parametrize("kw", [
    {"response_format": {"type": "json_object"}, "n": 2},
    {"tools": [CALC, WEATHER], "tool_choice": "required"},
    {"model": "deepseek-reasoner", "tools": [CALC]},
])
def test_streamed_equals_non_streamed(client, kw):
    kw = {"model": "deepseek-chat", "messages": USER, "max_tokens": 50, "temperature": 1.0, "seed": 5, **kw}
    whole = client.chat.completions.create(**kw)
    parts: dict[int, dict] = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            p = parts.setdefault(ch.index, {"content": "", "reasoning": "", "calls": {}, "finish": None})
            p["content"] += ch.delta.content or ""
            p["reasoning"] += (ch.delta.model_extra or {}).get("reasoning_content") or ""
            for tc in ch.delta.tool_calls or []:
                entry = p["calls"].setdefault(tc.index, ["", ""])
                entry[0] += tc.function.name or ""
                entry[1] += tc.function.arguments or ""
            p["finish"] = ch.finish_reason or p["finish"]
    for choice in whole.choices:
        p, m = parts[choice.index], choice.message
        assert p["content"] == (m.content or "") and p["finish"] == choice.finish_reason
        assert p["reasoning"] == (m.model_extra.get("reasoning_content") or "")
        assert [tuple(v) for _, v in sorted(p["calls"].items())] == \
            [(c.function.name, c.function.arguments) for c in m.tool_calls or []]
        if "response_format" in kw and choice.finish_reason == "stop":
            assert isinstance(json.loads(m.content), dict)
