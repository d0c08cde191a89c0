"""`dsv32 serve --api-key-file` with `$DSV32_API_KEY` (issue 35): SIGHUP reads the key file again
while a stream is in flight (the stream completes; the removed key is refused, the new one
accepted), a malformed file on reload keeps the keys in use, the log names keys but never prints
one, and the start-up log says which device `--device auto` chose."""
import json
import os
import signal
import time

import httpx

from dsv32.engine.device import resolve_device

from .test_shutdown import Serve

USER = [{"role": "user", "content": "Hi"}]
OLD, NEW, ENV = "sk-old-alice-4f1", "sk-new-bob-9c2", "sk-env-7d0"


def status(s: Serve, key: str) -> int:
    return httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code


def wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def running(s: Serve) -> float:
    text = httpx.get(s.url + "/metrics", headers={"Authorization": f"Bearer {ENV}"}, timeout=10).text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("dsv32:num_requests_running "))


def test_sighup_reloads_keys_while_a_stream_is_in_flight(server_ckpt, tmp_path, monkeypatch):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# keys\nalice: {OLD}\n")
    os.chmod(keys, 0o600)
    monkeypatch.setenv("DSV32_API_KEY", ENV)
    s = Serve(server_ckpt, "--max-model-len", "256", "--api-key-file", str(keys)).wait_ready()
    try:
        assert status(s, OLD) == 200 and status(s, NEW) == 401 and status(s, ENV) == 200
        body = {"model": "m", "messages": USER, "max_tokens": 100, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {OLD}"}) as r:
            events = (line[6:] for line in r.iter_lines() if line.startswith("data: "))
            next(events), next(events)                     # alice's stream is generating
            keys.write_text(f"bob: {NEW}\n")
            s.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: status(s, OLD) == 401)        # alice's key is gone for new requests
            assert status(s, NEW) == 200 and status(s, ENV) == 200
            assert running(s) == 1                          # ... and her stream runs on
            rest = list(events)
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["usage"]["completion_tokens"] == 100
        assert json.loads(rest[-3])["choices"][0]["finish_reason"] == "length"

        keys.write_text(f"bob {NEW}\n")                     # malformed: bob's key stays
        s.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert status(s, NEW) == 200 and status(s, OLD) == 401 and s.proc.poll() is None
        code, out = s.terminate()
    finally:
        s.close()
    assert code == 0
    assert f"device {resolve_device('auto')} (auto)" in out
    assert "API key required (2 accepted: api-key-1, alice) (api-key-1 is $DSV32_API_KEY)" in out
    assert f"API keys reloaded from {keys}: api-key-1, bob" in out
    assert f"API keys NOT reloaded (the 2 in use stay): {keys}, line 1: expected `NAME: KEY" in out
    assert ' alice "POST /v1/chat/completions" 200 ' in out and ' bob "GET /v1/models" 200 ' in out
    assert ' api-key-1 "GET /metrics" 200 ' in out
    assert not [k for k in (OLD, NEW, ENV) if k in out], out
