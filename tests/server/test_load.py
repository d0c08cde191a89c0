"""Load: 32 concurrent streaming clients, a quarter of them leaving mid-stream; everyone else
finishes, nothing answers 5xx, and the engine ends idle (no running request, no cache block held)."""
import asyncio
import json
import time

import httpx

USER = [{"role": "user", "content": "Tell me a story"}]


def wait_idle(server, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = m["dsv32:num_requests_running"] == 0 and m["dsv32:num_requests_waiting"] == 0 \
            and m["dsv32:kv_cache_usage_perc"] == 0
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_32_streams_with_disconnects(server):
    async def client_run(http: httpx.AsyncClient, i: int, leave: bool):
        body = {"model": "tiny", "messages": USER, "stream": True, "max_tokens": 60 if leave else 12,
                "ignore_eos": True, "seed": i, "stream_options": {"include_usage": True}}
        chunks, usage = 0, None
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return status, chunks, usage
                chunk = json.loads(line[6:])
                assert "error" not in chunk
                usage = chunk.get("usage") or usage
                chunks += 1
                if leave and chunks == 4:
                    return status, chunks, None    # closing the response drops the connection
        return status, chunks, None

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(client_run(http, i, i % 4 == 0) for i in range(32)))

    results = asyncio.run(main())
    assert all(status == 200 for status, _, _ in results)
    for i, (_, chunks, usage) in enumerate(results):
        if i % 4:
            assert usage["completion_tokens"] == 12
        else:
            assert usage is None and chunks == 4
    m = wait_idle(server)
    assert m["dsv32:num_requests_running"] == 0 and m["dsv32:kv_cache_usage_perc"] == 0
    assert server.state.active == 0
    assert not [k for k in m if k.startswith("dsv32:http_requests_total") and "('status', '5" in k
                and "/health" not in k]
    assert m["dsv32:request_success_total[('finished_reason', 'abort')]"] >= 8


def test_non_streaming_disconnect_aborts(server):
    m = wait_idle(server)           # the server is shared: count no other test's tokens below
    assert m["dsv32:num_requests_running"] == 0 and m["dsv32:num_requests_waiting"] == 0
    before = m.get("dsv32:generation_tokens_total", 0)
    try:
        httpx.post(server.url + "/v1/chat/completions", timeout=0.2,
                   json={"messages": USER, "max_tokens": 900, "ignore_eos": True})
    except httpx.TimeoutException:
        pass
    m = wait_idle(server, timeout=60.0)   # the token count, not the wall clock, shows the abort
    assert m["dsv32:num_requests_running"] == 0 and m["dsv32:kv_cache_usage_perc"] == 0
    assert m["dsv32:generation_tokens_total"] - before < 800      # stopped long before max_tokens
