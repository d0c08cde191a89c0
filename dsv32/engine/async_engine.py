"""Asyncio front of the engine for the server: a background thread steps the engine; requests
and aborts reach it through an inbox, outputs come back through per-request asyncio queues."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator

from .config import EngineConfig
from .engine import BatchError, LLMEngine
from .sequence import RequestOutput, SamplingParams

log = logging.getLogger("dsv32.engine")
_ABORTED = object()   # put in a request's queue by abort(): its generate() ends without waiting for the engine


class AsyncLLM:
    """`async for out in llm.generate(prompt, params, request_id)`; `await llm.abort(request_id)`."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="dsv32-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "AsyncLLM":
        return cls(LLMEngine(cfg))

    # ---- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            self._drain_inbox(block=not self.engine.has_unfinished())
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except BatchError as e:  # a forward failed: its requests ended with "error", the rest go on
                outputs = e.outputs
            except Exception as e:  # the engine state is unknown: every request in flight fails, loudly
                log.exception("engine step failed; failing every request in flight")
                for rid in list(self.engine.requests):
                    self.engine.abort_request(rid)
                    self._deliver(rid, e)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, rid, payload = item
            if kind == "add":
                params, prepared = payload
                try:
                    self.engine.add_request(rid, None, params, prepared=prepared)
                except Exception as e:
                    self._deliver(rid, e)
            elif kind == "abort":
                out = self.engine.abort_request(rid)
                if out is not None:
                    self._deliver(rid, out)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, request_id: str, item) -> None:
        entry = self._queues.get(request_id)
        if entry is not None:
            loop, q = entry
            loop.call_soon_threadsafe(q.put_nowait, item)

    # ---- asyncio side ----------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str
                       ) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after every step that changed it (until it
        finishes or `abort` ends it). Raises ValueError (bad request) before the first output;
        aborts if the consumer leaves."""
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already running")
        prepared = self.engine.prepare(prompt, params)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", request_id, (params, prepared)))
        finished = False
        try:
            while not finished:
                item = await q.get()
                if item is _ABORTED:
                    return
                if isinstance(item, ValueError):
                    raise item
                if isinstance(item, BaseException):
                    raise RuntimeError(f"engine failed: {item}") from item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._inbox.put(("abort", request_id, None))
            self._queues.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        """End the request: its generate() stops now, with no further output, even while the engine
        is inside a long step (a first compile takes seconds); the engine frees it before its next."""
        self._deliver(request_id, _ABORTED)
        self._inbox.put(("abort", request_id, None))

    def metrics(self) -> dict:
        return self.engine.metrics()

    def shutdown(self) -> None:
        """Stop the engine thread, then the engine (tensor-parallel workers included)."""
        self._stop = True
        self._thread.join(timeout=10)
        self.engine.shutdown()
