"""Error bodies and statuses, API keys, the bounded queue, timeouts, --reasoning-only, readiness."""
import json
import threading
import time

import httpx
import openai
import pytest

from dsv32.engine.engine import EngineConfig, LLMEngine

from .conftest import start_server

USER = [{"role": "user", "content": "Hi"}]


def post(server, body, path="/v1/chat/completions", **kw):
    kw.setdefault("json", body) if body is not None else None
    return httpx.post(server.url + path, timeout=30, **kw)


def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body,status,param", [
    ({"messages": USER, "temperature": 3}, 422, "temperature"),
    ({"messages": USER, "top_p": 1.5}, 422, "top_p"),
    ({"messages": USER, "presence_penalty": -2.5}, 422, "presence_penalty"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, 422, "top_logprobs"),
    ({"messages": USER, "top_logprobs": 2}, 422, "top_logprobs"),
    ({"messages": USER, "n": 0}, 422, "n"),
    ({"messages": USER, "max_tokens": 0}, 422, "max_tokens"),
    ({"messages": USER, "stop": ["s"] * 17}, 422, "stop"),
    ({"messages": USER, "logit_bias": {"abc": 1}}, 422, "logit_bias"),
    ({"messages": USER, "logit_bias": {"5": 101}}, 422, "logit_bias"),
    ({"messages": USER, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({}, 400, "messages"),
    ({"messages": []}, 422, "messages"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "c1"}]}, 400, "messages"),
    ({"messages": USER, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": 'a"b'}}]}, 400, "messages"),
    ({"messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
    ({"messages": USER, "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"messages": USER, "thinking": {"type": "maybe"}}, 400, "thinking"),
    ({"messages": USER, "chat_template_kwargs": {"thinking": "yes"}}, 400, "chat_template_kwargs"),
    ({"messages": USER, "stream": "yes please"}, 400, "stream"),
    ({"messages": USER, "max_tokens": 100000}, 400, "max_tokens"),
])
def test_invalid_requests(server, body, status, param):
    err = error_of(post(server, body), status)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_context_overflow_code(server):
    err = error_of(post(server, {"messages": [{"role": "user", "content": "word " * 2000}]}), 400)
    assert err["code"] == "context_length_exceeded"


def test_bad_json_and_content_type(server):
    err = error_of(post(server, None, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json"
    error_of(post(server, None, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    error_of(post(server, None, content=b"\xff\xfe", headers={"content-type": "application/json"}), 400)


def test_unknown_model_route_and_method(server):
    err = error_of(post(server, {"model": "gpt-4", "messages": USER}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    error_of(httpx.get(server.url + "/v1/nothing"), 404)
    error_of(httpx.get(server.url + "/v1/chat/completions"), 405)


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tiny", messages=USER, temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])


def test_openapi_schema(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"):
        assert path in spec["paths"]
    assert "ChatCompletionRequest" in spec["components"]["schemas"]


@pytest.fixture(scope="module")
def keyed(server_ckpt, server_model):
    s = start_server(server_ckpt, server_model, api_keys=["sk-one", "sk-two"]).wait_ready()
    yield s
    s.stop()


def test_api_keys(keyed):
    assert httpx.get(keyed.url + "/health").status_code == 200          # no key needed
    error_of(httpx.get(keyed.url + "/metrics"), 401)                      # behind the key (issue 35)
    assert httpx.get(keyed.url + "/metrics", headers={"Authorization": "Bearer sk-one"}).status_code == 200
    assert httpx.get(keyed.url + "/").status_code == 200
    err = error_of(httpx.get(keyed.url + "/v1/models"), 401)
    assert err["type"] == "authentication_error"
    error_of(httpx.get(keyed.url + "/v1/models", headers={"Authorization": "Bearer sk-three"}), 401)
    error_of(post(keyed, {"messages": USER}, headers={"Authorization": "Basic sk-one"}), 401)
    assert httpx.get(keyed.url + "/v1/models", headers={"Authorization": "Bearer sk-two"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="bad", max_retries=0).models.list()
    r = keyed.client().chat.completions.create(model="tiny", messages=USER, max_tokens=1)
    assert r.usage.completion_tokens == 1


def test_queue_full_and_timeout(server_ckpt, server_model):
    s = start_server(server_ckpt, server_model, engine_kw={"max_num_seqs": 1, "max_model_len": 8192},
                     max_queue=1, request_timeout=2.5).wait_ready()
    try:
        results = {}
        long_tokens = 8000          # far more than 2.5 s of work

        def long(i):
            body = {"messages": USER, "max_tokens": long_tokens, "ignore_eos": True}
            results[i] = post(s, body)

        threads = [threading.Thread(target=long, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while s.state.active < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        err = error_of(post(s, {"messages": USER, "max_tokens": 1}), 429)
        assert err["type"] == "rate_limit_error"
        streamed = httpx.post(s.url + "/v1/chat/completions", json={"messages": USER, "stream": True}, timeout=30)
        assert streamed.status_code == 429                      # refused before the stream starts
        for t in threads:
            t.join()
        for r in results.values():   # cut by the 2.5 s timeout, partial answer kept
            c = r.json()["choices"][0]
            assert r.status_code == 200 and c["finish_reason"] == "insufficient_system_resource"
        body = {"messages": USER, "max_tokens": long_tokens, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30) as r:
            data = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        assert data[-1]["choices"][0]["finish_reason"] == "insufficient_system_resource"
        assert s.state.active == 0
        m = s.metrics()
        assert m["dsv32:requests_rejected_total"] >= 2
        assert m["dsv32:request_success_total[('finished_reason', 'timeout')]"] == 3
        assert m["dsv32:num_requests_running"] == 0
    finally:
        s.stop()


def test_reasoning_only(server_ckpt, server_model):
    s = start_server(server_ckpt, server_model, reasoning_only=True).wait_ready()
    try:
        tools = [{"type": "function", "function": {"name": "f"}}]
        err = error_of(post(s, {"messages": USER, "tools": tools}), 400)
        assert "reasoning-only" in err["message"] and "tool" in err["message"]
        body = {"model": "deepseek-chat", "messages": USER, "thinking": {"type": "disabled"}, "max_tokens": 2}
        r = post(s, body).json()
        assert r["choices"][0]["message"]["reasoning_content"] is not None   # thinking stays on
    finally:
        s.stop()


def test_health_503_until_loaded(server_ckpt, server_model):
    gate = threading.Event()

    def slow_factory():
        gate.wait(30)
        return LLMEngine(EngineConfig(model=str(server_ckpt), max_model_len=256), model=server_model)

    s = start_server(server_ckpt, server_model, factory=slow_factory)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(s.url + "/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert error_of(r, 503)["code"] == "not_ready"
        error_of(post(s, {"messages": USER}), 503)
        gate.set()
        s.wait_ready()
        assert post(s, {"messages": USER, "max_tokens": 1}).status_code == 200
    finally:
        gate.set()
        s.stop()


def test_error_mid_stream_is_an_event(server, monkeypatch):
    """A failing engine step ends the stream with an `error` event, and the server lives on."""
    engine = server.state.llm.engine
    real = engine.runner.run
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(batch)

    monkeypatch.setattr(engine.runner, "run", flaky)
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                      json={"messages": USER, "max_tokens": 10, "stream": True}) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and "error" in json.loads(data[-2])
    monkeypatch.setattr(engine.runner, "run", real)
    assert post(server, {"messages": USER, "max_tokens": 1}).status_code == 200


def test_oversized_body_is_413(server):
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n{")
        data = b""
        while b"request_too_large" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 413") and b"request_too_large" in data
