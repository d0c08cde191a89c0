"""`dsv32 serve` start-up and shutdown: SIGTERM lets requests in flight finish and exits 0; what is
still running at --shutdown-timeout is cut with an in-band error (streams) or a 503 body; an empty
API key is a start-up error; the log carries no progress bar."""
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from dsv32.cli import main
from dsv32.server.cli import api_keys

USER = [{"role": "user", "content": "Hi"}]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`dsv32 serve` in a subprocess, its output collected."""

    def __init__(self, ckpt, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "dsv32.cli", "serve", "--model", str(ckpt), "--port",
                                      str(self.port), "--served-model-name", "m", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self) -> "Serve":
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)

    def terminate(self) -> tuple[int, str]:
        """SIGTERM; the exit status and everything the server printed."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        return code, self.proc.stdout.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def data_lines(response: httpx.Response):
    return (line[6:] for line in response.iter_lines() if line.startswith("data: "))


def test_sigterm_drains_and_exits_0(server_ckpt):
    s = Serve(server_ckpt, "--max-model-len", "256").wait_ready()
    try:
        body = {"model": "m", "messages": USER, "max_tokens": 40, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
            events = data_lines(r)
            next(events)
            s.proc.send_signal(signal.SIGTERM)          # mid-stream: the answer still completes
            rest = list(events)
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
        assert s.proc.wait(timeout=60) == 0
        out = s.proc.stdout.read()
        assert "every request in flight finished" in out and "no API key" in out
        assert "%|" not in out and "tensor/s" not in out, out           # no tqdm bar in the log
    finally:
        s.close()


def test_sigterm_cuts_what_outlasts_the_timeout(server_ckpt):
    s = Serve(server_ckpt, "--max-model-len", "8192", "--shutdown-timeout", "1").wait_ready()
    try:
        long = {"model": "m", "messages": USER, "max_tokens": 8000, "ignore_eos": True}
        plain = {}
        worker = threading.Thread(target=lambda: plain.update(
            r=httpx.post(s.url + "/v1/chat/completions", json=long, timeout=60)))
        worker.start()
        with httpx.stream("POST", s.url + "/v1/chat/completions", json={**long, "stream": True}, timeout=60) as r:
            events = data_lines(r)
            next(events), next(events)                      # the role chunk, then generated text
            deadline = time.monotonic() + 30
            while httpx.get(s.url + "/metrics").text.count("dsv32:num_requests_running 2.0") == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            rest = list(events)
            cut_after = time.monotonic() - t0
        worker.join(timeout=30)
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert error["code"] == "server_shutdown" and error["type"] == "service_unavailable"
        assert all("choices" in json.loads(e) for e in rest[:-2])     # text up to the cut, then the error
        assert 0.9 < cut_after < 10
        r = plain["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutdown"
        assert s.proc.wait(timeout=60) == 0
        out = s.proc.stdout.read()
        assert "2 request(s) cut at the timeout" in out and "Traceback" not in out, out
    finally:
        s.close()


def test_empty_api_key_is_a_startup_error(server_ckpt, capsys):
    t0 = time.monotonic()
    assert main(["serve", "--model", str(server_ckpt), "--api-key", "", "--port", str(free_port())]) == 2
    assert "--api-key: an API key must not be empty" in capsys.readouterr().err
    assert main(["serve", "--model", str(server_ckpt), "--api-key", "ok", "--api-key", " k",
                 "--port", str(free_port())]) == 2
    assert "whitespace" in capsys.readouterr().err
    assert time.monotonic() - t0 < 30


def test_api_key_sources(caplog):
    caplog.set_level(logging.WARNING, logger="dsv32.server")
    assert api_keys(["a"], None) == ["a"] and not caplog.records
    assert api_keys(["a"], "") == ["a"] and api_keys([], "  \n") == []
    assert "DSV32_API_KEY is set but empty" in caplog.text
    assert api_keys([], " sk-env\n") == ["sk-env"]
    assert api_keys(["ключ"], "b") == ["ключ", "b"]
    for flags, env in (([""], None), (["a\nb"], None), ([], "a\x00b")):
        with pytest.raises(ValueError, match="API key"):
            api_keys(flags, env)
