"""Real uvicorn servers on random ports over one generated tiny checkpoint, and clients for them.

Chat requests may carry the test-only field `x_force` (text): the test hook of the app factory then
forces the model to generate exactly those tokens (then end-of-sentence), which is how a random model
is made to think, answer and call tools; `x_prefer` only leans towards a text, so that the request's
grammar (applied after the hook) can be seen refusing it.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from dsv32.chat import Tokenizer
from dsv32.engine.engine import EngineConfig, LLMEngine
from dsv32.model.checkpoint import load_model
from dsv32.model.init_tiny import init_tiny
from dsv32.server import ServerConfig, create_app


class ForceTokens:
    """Logits processor making the sequence generate `ids` (then sample freely)."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def __call__(self, out: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(out) < len(self.ids):
            logits.fill_(float("-inf"))
            logits[self.ids[len(out)]] = 0.0
        return logits


class PreferTokens:
    """Logits processor pushing the sequence towards `ids` while it follows them (the grammar, which
    runs after the test hooks, may still refuse them)."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def __call__(self, out: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(out) < len(self.ids) and out == self.ids[:len(out)]:
            logits[self.ids[len(out)]] += 100.0
        return logits


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.load()


def force_hook(tokenizer: Tokenizer):
    """`x_force`: generate exactly this text then stop; `x_force_prefix`: start with it, then go on;
    `x_prefer`: lean towards this text, then stop (within what the grammar allows)."""
    def hook(req) -> list:
        extra = req.model_extra or {}
        if isinstance(extra.get("x_force"), str):
            return [ForceTokens(tokenizer.encode(extra["x_force"]) + [tokenizer.eos_id])]
        if isinstance(extra.get("x_force_prefix"), str):
            return [ForceTokens(tokenizer.encode(extra["x_force_prefix"]))]
        if isinstance(extra.get("x_prefer"), str):
            return [PreferTokens(tokenizer.encode(extra["x_prefer"]) + [tokenizer.eos_id])]
        return []
    return hook


@pytest.fixture(scope="session")
def server_ckpt(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("server_tiny"), seed=0, layers=1, hidden=64, shards=1)


@pytest.fixture(scope="session")
def server_model(server_ckpt):
    return load_model(server_ckpt, progress=False)


class RunningServer:
    """A uvicorn server in a background thread; `url`, `client()`, `async_client()`, `stop()`.
    With `ssl` (uvicorn's ssl_* arguments) it serves HTTPS, and its own calls use `verify`."""

    def __init__(self, app, api_key: str = "none", ssl: dict | None = None, verify=True):
        self.app, self.api_key, self.verify = app, api_key, verify
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"{'https' if ssl else 'http'}://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=5, **(ssl or {})))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()

    @property
    def state(self):
        return self.app.state.server

    def wait_ready(self, timeout: float = 60.0) -> "RunningServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2, verify=self.verify).status_code == 200:
                    return self
            time.sleep(0.05)
        raise TimeoutError("server did not become ready")

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0, timeout=60, **kw)

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        """Sample name (with labels) -> value from /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {self.api_key}"}, timeout=10,
                         verify=self.verify).text
        return {s.name + (str(sorted(s.labels.items())) if s.labels else ""): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(ckpt, model, tokenizer=None, engine_kw: dict | None = None, factory=None,
                 client_key: str | None = None, **cfg_kw) -> RunningServer:
    """A server over `model`; its own calls (`client()`, `metrics()`) use `client_key`, by default
    the first `api_keys` entry."""
    engine_cfg = EngineConfig(model=str(ckpt), **{"max_model_len": 1024, "max_num_seqs": 16, **(engine_kw or {})})
    cfg = ServerConfig(engine=engine_cfg, served_model_name="tiny", **cfg_kw)
    factory = factory or (lambda: LLMEngine(engine_cfg, model=model))
    app = create_app(cfg, engine_factory=factory,
                     extra_processors=force_hook(tokenizer) if tokenizer is not None else None)
    return RunningServer(app, api_key=client_key or (cfg.api_keys or ["none"])[0])


def keyed_server(directory, ckpt, model, keys: str, client_key: str, engine_kw: dict,
                 **cfg_kw) -> RunningServer:
    """A ready server whose keys come from a key file with the text `keys` (mode 600, in
    `directory`)."""
    path = directory / "keys.txt"
    path.write_text(keys)
    path.chmod(0o600)
    return start_server(ckpt, model, engine_kw=engine_kw, client_key=client_key, api_key_file=path,
                        **cfg_kw).wait_ready()


def key_client(server: RunningServer, key: str) -> openai.OpenAI:
    """An official client of `server` that sends `key`."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def server(server_ckpt, server_model, tokenizer):
    """The main server: no API key, up to 40 sequences, forced-token hook."""
    s = start_server(server_ckpt, server_model, tokenizer, engine_kw={"max_num_seqs": 40}).wait_ready()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return server.client()
