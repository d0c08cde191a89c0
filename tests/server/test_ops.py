"""Operations: /metrics names and histograms, access log, `dsv32 serve` (SIGTERM drains in-flight
streams; --tensor-parallel-size), and the parser-event -> delta translation."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import httpx

from dsv32.chat import ContentDelta, Done, ReasoningDelta, ToolCallArguments, ToolCallStart
from dsv32.server.serving_chat import events_to_deltas, reasoning_tokens

from .conftest import start_server

USER = [{"role": "user", "content": "Hi"}]
METRICS = ["dsv32:num_requests_running", "dsv32:num_requests_waiting", "dsv32:kv_cache_usage_perc",
           "dsv32:prefix_cache_queries_total", "dsv32:prefix_cache_hits_total", "dsv32:prompt_tokens_total",
           "dsv32:generation_tokens_total"]
HISTOGRAMS = ["dsv32:time_to_first_token_seconds", "dsv32:inter_token_latency_seconds",
              "dsv32:e2e_request_latency_seconds"]


def test_metrics(server, client):
    before = server.metrics()
    client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = server.metrics()
    for name in METRICS:
        assert name in m, name
    for name in HISTOGRAMS:
        assert f"{name}_count" in m and f"{name}_sum" in m
        assert any(k.startswith(f"{name}_bucket") and "'+Inf'" in k for k in m)
    assert m["dsv32:generation_tokens_total"] - before.get("dsv32:generation_tokens_total", 0) >= 3
    assert m["dsv32:time_to_first_token_seconds_count"] > before.get("dsv32:time_to_first_token_seconds_count", 0)
    itl = "dsv32:inter_token_latency_seconds_count"
    assert m[itl] >= before.get(itl, 0) + 2
    assert m["dsv32:e2e_request_latency_seconds_count"] > before.get("dsv32:e2e_request_latency_seconds_count", 0)
    assert 0 <= m["dsv32:kv_cache_usage_perc"] <= 1


def test_access_log_one_line_per_request(server, caplog):
    with caplog.at_level(logging.INFO, logger="dsv32.server.access"):
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 1})
        httpx.get(server.url + "/nothing")
        time.sleep(0.1)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "dsv32.server.access"]
    assert len(lines) == 2
    assert '"POST /v1/chat/completions" 200' in lines[0] and r.headers["x-request-id"] in lines[0]
    assert r.json()["id"] == "chatcmpl-" + r.headers["x-request-id"]
    assert '"GET /nothing" 404' in lines[1]


def test_events_to_deltas():
    events = [ReasoningDelta("a"), ReasoningDelta("b"), ContentDelta("c"), ToolCallStart(0, "call_1", "f"),
              ToolCallArguments(0, '{"x": '), ToolCallArguments(0, "1}"), Done("tool_calls", ())]
    out = [(d.model_dump(exclude_unset=True), f) for d, f in events_to_deltas(events)]
    assert out == [
        ({"reasoning_content": "ab"}, None),
        ({"content": "c"}, None),
        ({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                          "function": {"name": "f", "arguments": ""}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '{"x": '}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}, None),
        ({}, "tool_calls"),
    ]
    assert reasoning_tokens([5, 6, 99, 7], 99, True) == 2
    assert reasoning_tokens([5, 6], 99, True) == 2 and reasoning_tokens([5, 99], 99, False) == 0


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_indivisible_tensor_parallel_size_fails_fast(server_ckpt, caplog):
    """The model cannot be split over 3 ranks: the server reports why and exits (TP=2 serving is
    tested in tests/parallel/test_tp_server.py)."""
    from dsv32.cli import main

    t0 = time.monotonic()
    assert main(["serve", "--model", str(server_ckpt), "--tensor-parallel-size", "3",
                 "--port", str(_free_port())]) == 1
    assert "is not divisible by tensor_parallel_size 3" in caplog.text
    assert time.monotonic() - t0 < 60


def test_serve_sigterm_drains_in_flight_stream(server_ckpt):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dsv32.cli", "serve", "--model", str(server_ckpt), "--port",
                             str(port), "--max-model-len", "256", "--served-model-name", "m", "--api-key", "k"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        body = {"model": "m", "messages": USER, "max_tokens": 40, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": "Bearer k"}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
            proc.send_signal(signal.SIGTERM)     # mid-stream: the answer still completes
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]]
        assert finish[-1] == "length"
        # uvicorn re-raises the signal once shut down, so the exit is "killed by SIGTERM", cleanly
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        out = proc.stdout.read()
        assert '"POST /v1/chat/completions" 200' in out and "Application shutdown complete" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_failed_warm_up_is_logged_and_the_server_still_serves(server_ckpt, server_model, caplog):
    """The server warms the decode up before it reports ready (LLMEngine.warmup); if that fails,
    the log says so and requests are served anyway."""
    from dsv32.engine.engine import EngineConfig, LLMEngine

    class Cold(LLMEngine):
        def warmup(self) -> float:
            raise RuntimeError("inductor is broken here (test)")
    cfg = EngineConfig(model=str(server_ckpt), max_model_len=256, max_num_seqs=2)
    with caplog.at_level(logging.INFO, logger="dsv32.server"):
        s = start_server(server_ckpt, server_model, engine_kw=dict(max_model_len=256, max_num_seqs=2),
                         factory=lambda: Cold(cfg, model=server_model)).wait_ready()
        try:
            out = s.client().completions.create(model="tiny", prompt="Hello", max_tokens=2)
        finally:
            s.stop()
    assert out.choices[0].text is not None and out.usage.completion_tokens >= 1
    assert "warm-up failed, serving without it" in caplog.text and "inductor is broken here" in caplog.text
