"""Grammar-constrained answers end to end through the server: tool_choice required / named (also
streamed), strict tools, json_object / json_schema, and invalid schemas answered 400. The model is
random, so the schemas are narrow (enums, booleans) to keep the answers short."""
import json

import httpx
import pytest


USER = [{"role": "user", "content": "Weather in Paris or Rome? Answer in json."}]


def tool(name, cities=("Paris", "Rome"), strict=None):
    fn = {"name": name, "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": list(cities)}}, "required": ["city"], "additionalProperties": False}}
    if strict is not None:
        fn["strict"] = strict
    return {"type": "function", "function": fn}


def test_tool_choice_required(client):
    r = client.chat.completions.create(model="deepseek-chat", messages=USER, tools=[tool("get_weather")],
                                       tool_choice="required", max_tokens=120, seed=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    for call in c.message.tool_calls:
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")


def test_tool_choice_named_streamed(client):
    tools = [tool("get_weather"), tool("get_time", cities=("Oslo",))]
    stream = client.chat.completions.create(
        model="deepseek-chat", messages=USER, tools=tools, max_tokens=120, seed=1, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls, finish = {}, None
    for chunk in stream:
        ch = chunk.choices[0]
        for tc in ch.delta.tool_calls or []:
            if tc.id:
                calls[tc.index] = [tc.function.name, tc.function.arguments or ""]
            else:
                calls[tc.index][1] += tc.function.arguments
        finish = ch.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0][0] == "get_time" and json.loads(calls[0][1]) == {"city": "Oslo"}


def test_json_schema(client):
    schema = {"type": "object", "properties": {"sunny": {"type": "boolean"}}, "required": ["sunny"],
              "additionalProperties": False}
    r = client.chat.completions.create(
        model="deepseek-chat", messages=USER, max_tokens=60, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}})
    c = r.choices[0]
    assert c.finish_reason == "stop" and isinstance(json.loads(c.message.content)["sunny"], bool)


def test_json_object_in_thinking_mode(client):
    r = client.chat.completions.create(
        model="deepseek-reasoner", messages=USER, max_tokens=40, seed=3, response_format={"type": "json_object"},
        extra_body={"x_force_prefix": "ok</think>"})    # end the reasoning; the grammar takes the answer
    c = r.choices[0]
    assert c.message.model_extra["reasoning_content"] == "ok"
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)
    else:   # cut by max_tokens: a prefix of a JSON object
        assert c.finish_reason == "length" and c.message.content.lstrip().startswith("{")


@pytest.mark.parametrize("body", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
    {"response_format": {"type": "json_schema"}},
    {"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {"type": "string"}}}],
     "tool_choice": "auto"},
])
def test_invalid_schemas_are_400(server, body):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 1, **body},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_schema"


def test_named_choice_must_name_a_tool(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "messages": USER, "tools": [tool("a")], "tool_choice": {"type": "function", "function": {"name": "b"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
