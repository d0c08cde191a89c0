"""Server settings and the state every handler shares: the engine (once loaded), model ids, the
admission counter behind the bounded queue, the API keys and their limits, and the metrics."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from dsv32.engine.async_engine import AsyncLLM
from dsv32.engine.engine import EngineConfig, LLMEngine

from .errors import APIError
from .keys import KeyFileError, KeyRing, Limits, check_api_key, fixed_keys
from .limits import KeyLimiter
from .metrics import Metrics

log = logging.getLogger("dsv32.server")

CHAT_ALIAS, REASONER_ALIAS = "deepseek-chat", "deepseek-reasoner"


@dataclass
class ServerConfig:
    """What `dsv32 serve` is asked to do (the engine settings included)."""

    engine: EngineConfig
    served_model_name: str = "dsv32"
    api_keys: list[str] = field(default_factory=list)   # named api-key-1, api-key-2, ... in the log
    max_queue: int = 256                  # sequences allowed to wait beyond max_num_seqs
    request_timeout: float | None = 600.0  # seconds from arrival; None: no limit
    reasoning_only: bool = False           # Speciale weights: thinking always on, no tools
    safety_net: bool = True                # constrain every chat answer (dsv32.chat.grammar)
    system_fingerprint: str = "dsv32-0.1"
    sse_keepalive: float = 15.0            # seconds without output before a `: keep-alive` SSE comment
    max_body_bytes: int = 64 << 20         # larger request bodies get 413 (chunked ones too)
    api_key_file: Path | None = None       # `NAME: KEY [options]` lines (keys.py); read again on SIGHUP
    max_concurrent_per_key: int | None = None     # default of keys without their own max_concurrent
    tokens_per_minute_per_key: int | None = None  # default of keys without their own tpm
    metrics_public: bool = False           # /metrics answers without a key

    def __post_init__(self) -> None:
        for key in self.api_keys:
            check_api_key(key)
        if self.key_limits != Limits() and not self.api_keys and self.api_key_file is None:
            raise ValueError("per-key limits need API keys (--api-key-file, --api-key or $DSV32_API_KEY)")

    @property
    def key_limits(self) -> Limits:
        """The limits of a key that sets none of its own."""
        return Limits(self.max_concurrent_per_key, self.tokens_per_minute_per_key)


class Cuttable(Protocol):
    """A request in flight that shutdown can end early."""

    def cut(self) -> None: ...


class ServerState:
    """Shared by all requests; the engine is None until the background load finishes."""

    def __init__(self, cfg: ServerConfig, engine_factory: Callable[[], LLMEngine] | None = None):
        self.cfg = cfg
        self.engine_factory = engine_factory or (lambda: LLMEngine(cfg.engine))
        self.llm: AsyncLLM | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.keys = KeyRing(fixed_keys(cfg.api_keys, cfg.key_limits), cfg.api_key_file, cfg.key_limits)
        self.limiter = KeyLimiter()
        self.active = 0          # sequences admitted and not yet released
        self.metrics = Metrics(lambda: self.llm.metrics() if self.llm is not None else None)
        self.on_load_error: Callable[[], None] | None = None
        self.draining = False    # shutting down: no new generations
        self._live: set[Cuttable] = set()
        self.cut_count = 0       # generations ended by the shutdown timeout
        self._thread: threading.Thread | None = None
        self._cut_timer: asyncio.TimerHandle | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start_loading(self) -> None:
        self._thread = threading.Thread(target=self._load, name="dsv32-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        t0 = time.monotonic()
        try:
            engine = self.engine_factory()
            # llguidance's view of the vocabulary holds the GIL for about a second: build it now,
            # not during the first chat request (which would stall every other request meanwhile)
            engine.grammars.tokenizer_view()
            self._warm_up(engine)
            self.llm = AsyncLLM(engine)
        except Exception as e:  # reported by /health; the CLI exits
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("failed to load the model: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error()
            return
        log.info("model loaded in %.1fs (max_model_len %d); ready", time.monotonic() - t0,
                 engine.max_model_len)

    @staticmethod
    def _warm_up(engine: LLMEngine) -> None:
        """Build the batch decode's graphs before the first requests need them; a failure here is
        logged and left to the batches that would need them (single requests may still run)."""
        log.info("warming up the decode (compiling its batch graphs)...")
        try:
            log.info("warm-up done in %.1fs", engine.warmup())
        except Exception as e:  # noqa: BLE001  (logged; requests that need the graphs fail alone)
            log.warning("warm-up failed, serving without it (batches may fail or compile later): %s: %s",
                        type(e).__name__, e)

    def reload_keys(self) -> None:
        """SIGHUP: read the key file again; a bad file keeps the keys in use, and the log says why."""
        try:
            keys = self.keys.reload()
        except KeyFileError as e:
            log.error("API keys NOT reloaded (the %d in use stay): %s", len(self.keys.names()), e)
            return
        log.info("API keys reloaded from %s: %s", self.cfg.api_key_file, ", ".join(k.name for k in keys))

    def start_draining(self, timeout: float) -> None:
        """Shutdown began (on the event loop): refuse new generations, and cut the ones still
        running after `timeout` seconds."""
        self.draining = True
        if self._live:
            log.info("draining %d request(s) in flight (up to %.0fs)", len(self._live), timeout)
        self._cut_timer = asyncio.get_running_loop().call_later(timeout, self.cut_all)

    def cut_all(self) -> None:
        if self._live:
            self.cut_count += len(self._live)
            log.warning("shutdown timeout: cutting %d request(s) still in flight", len(self._live))
        for gen in list(self._live):
            gen.cut()

    def shutdown(self) -> None:
        if self._cut_timer is not None:
            self._cut_timer.cancel()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self.llm is not None:
            self.llm.shutdown()

    # ---- per request -----------------------------------------------------------------------------
    def ready(self) -> AsyncLLM:
        """The engine, or 503 while loading (or after a failed load)."""
        if self.llm is None:
            why = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, why, code="not_ready")
        return self.llm

    def model_ids(self) -> dict[str, bool]:
        """Accepted model ids -> whether each switches thinking on by default."""
        return {self.cfg.served_model_name: self.cfg.reasoning_only, CHAT_ALIAS: self.cfg.reasoning_only,
                REASONER_ALIAS: True}

    def resolve_model(self, name: str | None) -> tuple[str, bool]:
        """(model id to answer with, default thinking) or 404."""
        ids = self.model_ids()
        name = name or self.cfg.served_model_name
        if name not in ids:
            raise APIError(404, f"model {name!r} does not exist; available: {', '.join(ids)}",
                           param="model", code="model_not_found")
        return name, ids[name]

    def admit(self, n: int, gen: Cuttable | None = None) -> None:
        """Take n sequence slots for `gen` or answer 429 when running + waiting would exceed the
        bound (503 once shutdown began)."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        limit = self.cfg.engine.max_num_seqs + self.cfg.max_queue
        if n > limit:
            raise APIError(422, f"n: {n} sequences can never fit this server ({limit} running or queued)",
                           param="n", code="invalid_value")
        if self.active + n > limit:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is at capacity ({limit} sequences running or queued); "
                                "retry later", code="queue_full")
        self.active += n
        if gen is not None:
            self._live.add(gen)

    def release(self, n: int, gen: Cuttable | None = None) -> None:
        self.active -= n
        self._live.discard(gen)
