"""Limits and API edges: the event loop stays free while a 10 MB prompt is tokenised, chunked
bodies meet the body limit, keep-alive comments while queued, Retry-After on 429, model cards by
id, UTF-8 API keys, and an unexpected error counted with its real status (500, not 0)."""
import json
import logging
import threading
import time

import httpx
import pytest

from dsv32.engine.engine import EngineConfig, LLMEngine
from dsv32.server import ServerConfig, create_app

from .conftest import RunningServer

USER = [{"role": "user", "content": "Hi"}]
NAME = "org/tiny-v1"       # a served name with a slash, as HF-style ids have


def make_server(ckpt, model, engine_kw: dict | None = None, **cfg_kw) -> RunningServer:
    engine_cfg = EngineConfig(model=str(ckpt), **{"max_model_len": 1024, "max_num_seqs": 4, **(engine_kw or {})})
    app = create_app(ServerConfig(engine=engine_cfg, served_model_name=NAME, **cfg_kw),
                     engine_factory=lambda: LLMEngine(engine_cfg, model=model))
    return RunningServer(app, api_key=(cfg_kw.get("api_keys") or ["none"])[0]).wait_ready()


@pytest.fixture(scope="module")
def busy(server_ckpt, server_model):
    """One sequence at a time, one more may wait; keep-alive every 0.1 s; bodies up to 16 MiB."""
    s = make_server(server_ckpt, server_model, engine_kw={"max_num_seqs": 1, "max_model_len": 4096},
                    max_queue=1, sse_keepalive=0.1, max_body_bytes=16 << 20)
    yield s
    s.stop()


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_health_answers_while_a_10mb_prompt_is_tokenised(busy):
    big = {"model": NAME, "messages": [{"role": "user", "content": "hello world, how are you? " * 400_000}],
           "max_tokens": 1}
    assert len(json.dumps(big)) > 10_000_000
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=httpx.post(busy.url + "/v1/chat/completions",
                                                                         json=big, timeout=300)))
    worker.start()
    done = [time.perf_counter()]       # when each ping came back: a gap is a stall, wherever it fell
    while worker.is_alive():
        assert httpx.get(busy.url + "/health", timeout=30).status_code == 200
        done.append(time.perf_counter())
        time.sleep(0.05)
    worker.join()
    assert error_of(result["r"], 400)["code"] == "context_length_exceeded"   # after tokenising it all
    gaps = [b - a - 0.05 for a, b in zip(done, done[1:])]
    assert len(gaps) >= 10, gaps          # the pings overlapped the seconds of tokenising
    assert max(gaps) < 0.5, sorted(gaps)[-5:]


def chunks(total: int, size: int = 64 << 10):
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


def test_chunked_body_over_the_limit_is_413(busy):
    body = json.dumps({"model": NAME, "messages": USER, "max_tokens": 1}).encode()
    ok = httpx.post(busy.url + "/v1/chat/completions", content=iter([body, b" " * 1000]), timeout=30,
                    headers={"content-type": "application/json"})
    assert ok.status_code == 200 and "content-length" not in ok.request.headers     # chunked, and fine
    before = busy.metrics().get("dsv32:http_requests_total[('path', '/v1/chat/completions'), ('status', '413')]", 0)
    r = httpx.post(busy.url + "/v1/chat/completions", timeout=30, headers={"content-type": "application/json"},
                   content=(x for part in ([body[:-1]], chunks(20 << 20), [b"}"]) for x in part))
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert error_of(r, 413)["code"] == "request_too_large"
    after = busy.metrics()["dsv32:http_requests_total[('path', '/v1/chat/completions'), ('status', '413')]"]
    assert after == before + 1
    assert httpx.post(busy.url + "/v1/chat/completions", json={"model": NAME, "messages": USER, "max_tokens": 1},
                      timeout=30).status_code == 200


def test_keepalive_while_queued_and_retry_after_on_429(busy):
    url = busy.url + "/v1/chat/completions"
    long = {"model": NAME, "messages": USER, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url, json=long, timeout=120) as running:
        data = (line for line in running.iter_lines() if line.startswith("data: {"))
        next(data), next(data)           # the role chunk, then generated text: it runs
        body = {"model": NAME, "messages": USER, "max_tokens": 2, "stream": True}
        with httpx.stream("POST", url, json=body, timeout=120) as queued:
            lines = queued.iter_lines()
            waiting = []
            for line in lines:           # queued behind the long request: comments only
                if line:
                    waiting.append(line)
                if waiting.count(": keep-alive") == 3:
                    break
            assert json.loads(waiting[0][6:])["choices"][0]["delta"]["role"] == "assistant"
            assert waiting[1:] == [": keep-alive"] * 3
            for refused in (httpx.post(url, json=long, timeout=30),
                            httpx.post(busy.url + "/v1/completions", timeout=30,
                                       json={"model": NAME, "prompt": "x", "stream": True})):
                assert error_of(refused, 429)["code"] == "queue_full"
                assert int(refused.headers["retry-after"]) >= 1
            running.close()              # the long one leaves: the queued one runs
            rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_model_by_id(busy):
    client = busy.client()
    card = client.models.retrieve(NAME)
    assert card.id == NAME and card.model_extra["max_model_len"] == 4096
    assert all(m.model_extra["max_model_len"] == 4096 for m in client.models.list())
    reasoner = httpx.get(busy.url + "/models/deepseek-reasoner").json()
    assert reasoner["id"] == "deepseek-reasoner" and reasoner["thinking"] is True and reasoner["object"] == "model"
    for path in ("/v1/models/org", "/v1/models/tiny", f"/v1/models/{NAME}/x", "/models/nope"):
        err = error_of(httpx.get(busy.url + path), 404)
        assert err["code"] == "model_not_found" and err["param"] == "model"


def test_unexpected_error_is_a_counted_500(busy, monkeypatch, caplog):
    import dsv32.server.serving_chat as serving_chat

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(serving_chat, "request_thinking", broken)
    caplog.set_level(logging.INFO, logger="dsv32.server.access")
    key = "dsv32:http_requests_total[('path', '/v1/chat/completions'), ('status', '500')]"
    before = busy.metrics().get(key, 0)
    r = httpx.post(busy.url + "/v1/chat/completions", json={"model": NAME, "messages": USER}, timeout=30)
    assert error_of(r, 500)["type"] == "server_error"
    deadline = time.monotonic() + 5
    while busy.metrics().get(key, 0) != before + 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert any(r.headers["x-request-id"] in rec.getMessage() and '" 500 ' in rec.getMessage()
               for rec in caplog.records if rec.name == "dsv32.server.access")
    assert not [k for k in busy.metrics() if k.startswith("dsv32:http_requests_total") and "('status', '0')" in k]
    monkeypatch.undo()
    assert httpx.post(busy.url + "/v1/chat/completions", json={"model": NAME, "messages": USER, "max_tokens": 1},
                      timeout=30).status_code == 200


def test_api_keys_compare_as_utf8(server_ckpt, server_model):
    key = "clé-ключ-🔑"
    s = make_server(server_ckpt, server_model, api_keys=[key, "plain"])
    try:
        utf8 = {"Authorization": b"Bearer " + key.encode("utf-8")}
        assert httpx.get(s.url + "/v1/models", headers=utf8).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers={"x-api-key": key.encode("utf-8")}).status_code == 200
        mangled = {"Authorization": b"Bearer " + key.encode("utf-8").decode("latin-1").encode("utf-8")}
        error_of(httpx.get(s.url + "/v1/models", headers=mangled), 401)
        assert httpx.get(s.url + f"/v1/models/{NAME}", headers={"Authorization": "Bearer plain"}).status_code == 200
        error_of(httpx.get(s.url + f"/v1/models/{NAME}"), 401)
    finally:
        s.stop()
    for bad in ("", "  ", " padded", "new\nline"):
        with pytest.raises(ValueError, match="API key"):
            ServerConfig(engine=EngineConfig(model=str(server_ckpt)), api_keys=[bad])
