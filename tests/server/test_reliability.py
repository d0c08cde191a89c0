"""Bad input never takes the server down: each of the malformed requests below, fired at one running
server, gets a 4xx with the OpenAI error body, is counted and logged with that status, and the
next normal request is served as usual."""
import json
import logging
import time

import httpx
import pytest

from .conftest import start_server

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = {"role": "user", "content": "Hi"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
WIDE = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}   # crashed llguidance
SURROGATE = "a\ud800b"        # json.dumps writes it as the escape "\ud800": valid JSON, invalid Unicode


def call(**kw):
    return {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}, **kw}


def answered(calls, call_id="c1", **tool_msg):
    """A chat body where an assistant message makes `calls` and one tool message answers."""
    return {"messages": [USER, {"role": "assistant", "content": "", "tool_calls": calls},
                         {"role": "tool", "content": "r", "tool_call_id": call_id, **tool_msg}], "max_tokens": 1}


def chat(*messages, **fields):
    return {"messages": list(messages) or [USER], "max_tokens": 1, **fields}


def nested(depth: int, leaf: str = "{}") -> str:
    return '{"a":' * depth + leaf + "}" * depth


def raw(text: str, content_type: str = "application/json") -> tuple[bytes, str]:
    return text.encode("utf-8", "surrogatepass"), content_type


CHAT_CASES = {
    # wrong types inside messages
    "tool_calls is a number": answered(5),
    "tool_calls is a bool": answered(True),
    "tool_calls is a string": answered("f()"),
    "tool_calls is an object": answered({"id": "c1"}),
    "tool_call_id is a list": answered([call()], call_id=["c1"]),
    "tool_call_id is an object": answered([call()], call_id={"id": "c1"}),
    "tool_calls[].id is a list": answered([call(id=["c1"])]),
    "tool_calls[].id is an object": answered([call(id={"v": 1})]),
    "tool_calls[] is a string": answered(["f()"]),
    "tool_calls[].function missing": answered([{"id": "c1", "type": "function"}]),
    "tool_calls[].function is a string": answered([call(function="f")]),
    "tool_calls[].function.name is a number": answered([call(function={"name": 5, "arguments": "{}"})]),
    "tool_calls[].function.name missing": answered([call(function={"arguments": "{}"})]),
    "tool_calls[].type is not function": answered([call(type="retrieval")]),
    "arguments is a list": answered([call(function={"name": "f", "arguments": [1, 2]})]),
    "arguments is JSON of a list": answered([call(function={"name": "f", "arguments": "[1, 2]"})]),
    "arguments is not JSON": answered([call(function={"name": "f", "arguments": "{oops"})]),
    "arguments nest 5000 deep": answered([call(function={"name": "f", "arguments": nested(5000)})]),
    "arguments hold a 5000-digit number": answered([call(function={"name": "f",
                                                                   "arguments": '{"n": ' + "7" * 5000 + "}"})]),
    "message name is a number": chat({"role": "user", "content": "x", "name": 5}),
    "messages entries are strings": {"messages": ["hello", "there"]},
    "messages is a string": {"messages": "hello"},
    "messages is empty": {"messages": []},
    "messages missing": {"model": "tiny"},
    "content is a number": chat({"role": "user", "content": 42}),
    "content is an object": chat({"role": "user", "content": {"text": "x"}}),
    "content parts nested in a list": chat({"role": "user", "content": [[{"type": "text", "text": "x"}]]}),
    "content part text is a number": chat({"role": "user", "content": [{"type": "text", "text": 1}]}),
    "content part is an image": chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}),
    "role unknown": chat({"role": "wizard", "content": "x"}),
    "role is a list": chat({"role": ["user"], "content": "x"}),
    "role missing": chat({"content": "x"}),
    "user message without content": chat({"role": "user"}),
    "reasoning_content is a number": chat(USER, {"role": "assistant", "content": "a", "reasoning_content": 1}, USER),
    "prefix before the last message": chat({"role": "assistant", "content": "x", "prefix": True}, USER),
    "tool message without a call": chat(USER, {"role": "tool", "content": "r", "tool_call_id": "c1"}),
    # lone surrogates wherever text is rendered or tokenised
    "surrogate in user content": chat({"role": "user", "content": SURROGATE}),
    "surrogate in a content part": chat({"role": "user", "content": [{"type": "text", "text": SURROGATE}]}),
    "surrogate in system content": chat({"role": "system", "content": SURROGATE}, USER),
    "surrogate in reasoning_content": chat(USER, {"role": "assistant", "content": "a", "reasoning_content": SURROGATE}),
    "surrogate in a tool result": answered([call()], content=SURROGATE),
    "surrogate in tool_call_id": answered([call()], call_id=SURROGATE),
    "surrogate in a tool-call name": answered([call(function={"name": SURROGATE, "arguments": "{}"})]),
    "surrogate escaped in arguments": answered([call(function={"name": "f", "arguments": '{"x": "\\ud800"}'})]),
    "surrogate in an arguments key": answered([call(function={"name": "f", "arguments": {SURROGATE: 1}})]),
    "surrogate in a tool name": chat(tools=[{"type": "function", "function": {"name": SURROGATE}}]),
    "surrogate in a tool description": chat(tools=[{"type": "function", "function": {
        "name": "f", "description": SURROGATE}}]),
    "surrogate in a tool schema key": chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {SURROGATE: {"type": "string"}}}}}]),
    "surrogate in a json_schema": chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "description": SURROGATE}}}),
    "surrogate in an unknown message field": chat({"role": "user", "content": "x", "meta": {SURROGATE: 1}}),
    "surrogate as the model": chat(model=SURROGATE),
    "surrogate as a logit_bias key": chat(logit_bias={SURROGATE: 1}),
    # sampling fields: wrong types, out of range, huge numbers
    "logit_bias key of 40 digits": chat(logit_bias={"9" * 40: 1}),
    "logit_bias key not an integer": chat(logit_bias={"1e5": 1}),
    "logit_bias value a string": chat(logit_bias={"5": "high"}),
    "logit_bias value over 100": chat(logit_bias={"5": 1000}),
    "logit_bias is a list": chat(logit_bias=[5]),
    "stop is a number": chat(stop=5),
    "stop holds numbers": chat(stop=[5, 6]),
    "stop is an object": chat(stop={"a": "b"}),
    "stop has 17 strings": chat(stop=["s"] * 17),
    "stop holds an empty string": chat(stop=[""]),
    "temperature is a string": chat(temperature="hot"),
    "temperature out of range": chat(temperature=3),
    "max_tokens is 2**70": chat(max_tokens=2**70),
    "max_tokens is negative": chat(max_tokens=-1),
    "max_tokens is a float": chat(max_tokens=1.5),
    "n is 2**70": chat(n=2**70),
    "seed is 2**70": chat(seed=2**70),
    "top_logprobs over 20": chat(logprobs=True, top_logprobs=21),
    "top_k is a string": chat(top_k="all"),
    "stream is a string": chat(stream="yes please"),
    "stream_options is a string": chat(stream=True, stream_options="usage"),
    "thinking type unknown": chat(thinking={"type": "maybe"}),
    "chat_template_kwargs thinking a string": chat(chat_template_kwargs={"thinking": "yes"}),
    "model unknown": chat(model="gpt-4"),
    "model is a number": chat(model=4),
    # tools, tool_choice, response_format
    "tools is an object": chat(tools={"type": "function"}),
    "tools[] without function": chat(tools=[{"type": "function"}]),
    "tools[] function name with a quote": chat(tools=[{"type": "function", "function": {"name": 'a"b'}}]),
    "tools has 129 entries": chat(tools=[TOOL] * 129),
    "tool parameters a string": chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
    "strict tool with 3000 parameters": chat(tools=[{"type": "function", "function": {
        "name": "f", "strict": True, "parameters": WIDE}}]),
    "tool with 3000 parameters": chat(tools=[{"type": "function", "function": {"name": "f", "parameters": WIDE}}]),
    "tool_choice required without tools": chat(tool_choice="required"),
    "tool_choice names an unknown tool": chat(tools=[TOOL],
                                              tool_choice={"type": "function", "function": {"name": "g"}}),
    "tool_choice is a number": chat(tool_choice=3),
    "response_format type unknown": chat(response_format={"type": "xml"}),
    "response_format is a string": chat(response_format="json"),
    "json_schema is a string": chat(response_format={"type": "json_schema", "json_schema": "x"}),
    # raw bodies: nesting, JSON syntax, encodings, content types
    "tool parameters nest 900 deep": raw('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, '
                                         '"tools": [{"type": "function", "function": {"name": "f", "parameters": '
                                         + nested(900) + "}}]}"),
    "json_schema nests 900 deep": raw('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, '
                                      '"response_format": {"type": "json_schema", "json_schema": {"name": "x", '
                                      '"schema": ' + nested(900) + "}}}"),
    "strict tool schema nests 900 deep": raw('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, '
                                             '"tools": [{"type": "function", "function": {"name": "f", "strict": true, '
                                             '"parameters": ' + nested(900) + "}}]}"),
    "body nests 100000 deep": raw('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    "content nests 3000 deep": raw('{"messages": [{"role": "user", "content": ' + "[" * 3000 + "]" * 3000 + "}]}"),
    "a 5000-digit max_tokens": raw('{"messages": [{"role": "user", "content": "x"}], "max_tokens": '
                                   + "9" * 5000 + "}"),
    "NaN temperature": raw('{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'),
    "Infinity top_p": raw('{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}'),
    "invalid JSON": raw('{"messages": [{"role": "user", "content": "x"}'),
    "empty body": raw(""),
    "body is a JSON array": raw('[{"role": "user", "content": "x"}]'),
    "body is a JSON string": raw('"hello"'),
    "body is null": raw("null"),
    "body is not UTF-8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "application/json"),
    "body is not JSON at all": (b"\x00\x01\x02 binary", "application/octet-stream"),
    "content type text/plain": raw(json.dumps(chat()), "text/plain"),
    "content type form": raw("messages=hello", "application/x-www-form-urlencoded"),
    "content type multipart": raw("--b\r\nContent-Disposition: form-data; name=\"messages\"\r\n\r\nx\r\n--b--\r\n",
                                  "multipart/form-data; boundary=b"),
}

COMPLETION_CASES = {
    "prompt with a surrogate": {"prompt": SURROGATE, "max_tokens": 1},
    "prompt list with a surrogate": {"prompt": ["ok", SURROGATE], "max_tokens": 1},
    "suffix with a surrogate": {"prompt": "def f(", "suffix": SURROGATE, "max_tokens": 1},
    "echo of a surrogate": {"prompt": SURROGATE, "echo": True, "max_tokens": 1},
    "prompt token id 2**70": {"prompt": [2**70], "max_tokens": 1},
    "prompt token id -1": {"prompt": [5, -1], "max_tokens": 1},
    "nested prompt token id 2**70": {"prompt": [[1], [2**70]], "max_tokens": 1},
    "prompt is an object": {"prompt": {"text": "x"}},
    "prompt mixes ids and text": {"prompt": [1, "a"]},
    "prompt is empty ids": {"prompt": [[]]},
    "prompt missing": {"max_tokens": 1},
    "17 prompts": {"prompt": ["x"] * 17, "max_tokens": 1},
    "suffix with token ids": {"prompt": [1, 2], "suffix": "x"},
    "suffix is a number": {"prompt": "x", "suffix": 5},
    "logprobs over 20": {"prompt": "x", "logprobs": 21},
    "best_of differs from n": {"prompt": "x", "best_of": 3},
    "echo is not a bool": {"prompt": "x", "echo": "maybe"},
    "stop holds a list": {"prompt": "x", "stop": [["a"]]},
    "prompt over the context": {"prompt": "word " * 3000, "max_tokens": 1},
    "invalid JSON": raw('{"prompt": '),
    "a 5000-digit token id": raw('{"prompt": [' + "1" * 5000 + "]}"),
}

MODEL_CASES = ["/v1/models/gpt-4", "/v1/models/org/tiny", "/models/unknown", "/v1/models/%ED%A0%80",
               "/v1/models/" + "x" * 5000, "/v1/models/tiny/", "/v1/models/deepseek-chat/extra"]

OTHER_CASES = [("PUT", CHAT), ("GET", COMPLETIONS), ("DELETE", "/v1/models"), ("POST", "/v1/models/tiny"),
               ("GET", "/v1/nothing")]

CASES = ([pytest.param("POST", CHAT, body, id=f"chat: {name}") for name, body in CHAT_CASES.items()]
         + [pytest.param("POST", COMPLETIONS, body, id=f"completions: {name}")
            for name, body in COMPLETION_CASES.items()]
         + [pytest.param("GET", path, None, id=f"GET {path[:40]}") for path in MODEL_CASES]
         + [pytest.param(method, path, None, id=f"{method} {path}") for method, path in OTHER_CASES])


@pytest.fixture(scope="module")
def rserver(server_ckpt, server_model):
    s = start_server(server_ckpt, server_model, engine_kw={"max_model_len": 1024}).wait_ready()
    yield s
    assert httpx.get(s.url + "/health").status_code == 200 and s.state.active == 0
    s.stop()


def route(path: str) -> str:
    """The metrics label AccessMiddleware gives a path."""
    if path in (CHAT, COMPLETIONS, "/v1/models"):
        return path
    for prefix in ("/v1/models/", "/models/"):
        if path.startswith(prefix):
            return prefix + "{id}"
    return "other"


def http_counts(server) -> dict[str, float]:
    return {k: v for k, v in server.metrics().items() if k.startswith("dsv32:http_requests_total")}


def http_key(path: str, status: int) -> str:
    return f"dsv32:http_requests_total[('path', '{route(path)}'), ('status', '{status}')]"


def send(server, method: str, path: str, body) -> httpx.Response:
    if body is None:
        return httpx.request(method, server.url + path, timeout=60)
    content, ctype = body if isinstance(body, tuple) else (json.dumps(body).encode(), "application/json")
    return httpx.request(method, server.url + path, content=content, headers={"content-type": ctype}, timeout=60)


def test_enough_bad_inputs():
    print(f"\nreliability: {len(CASES)} bad inputs fired")
    assert len(CASES) >= 40


@pytest.mark.parametrize("method,path,body", CASES)
def test_bad_input(rserver, caplog, method, path, body):
    caplog.set_level(logging.INFO, logger="dsv32.server.access")
    before = http_counts(rserver)
    r = send(rserver, method, path, body)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "not_found_error")
    key = http_key(path, r.status_code)
    deadline = time.monotonic() + 5    # the server counts and logs just after the answer has gone
    while (line := access_line(caplog, r.headers["x-request-id"])) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert line is not None and f'"{method} ' in line and f'" {r.status_code} ' in line, line
    after = http_counts(rserver)
    assert after[key] == before.get(key, 0) + 1                  # counted with its real status
    assert {k: v for k, v in after.items() if k != key and "/metrics" not in k} == \
        {k: v for k, v in before.items() if k != key and "/metrics" not in k}
    ok = rserver.client().chat.completions.create(model="tiny", messages=[USER], max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop") and ok.usage.completion_tokens >= 1


def access_line(caplog, request_id: str) -> str | None:
    return next((rec.getMessage() for rec in caplog.records
                 if rec.name == "dsv32.server.access" and request_id in rec.getMessage()), None)


def test_no_5xx_counted(rserver):
    codes = [k for k in http_counts(rserver) if "/health" not in k]
    assert codes and not [k for k in codes if "('status', '5" in k or "('status', '0')" in k]
