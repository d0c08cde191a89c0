"""One request's trip through the engine (admission, timeout, metrics), the server-sent-event
response, and abort-on-disconnect for non-streaming answers."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from dsv32.chat.messages import has_lone_surrogate
from dsv32.engine.sequence import CompletionOutput, RequestOutput, SamplingParams

from .errors import APIError, bad_value
from .state import ServerState

T = TypeVar("T")
TIMEOUT = "timeout"   # finish reason of a request cut by --request-timeout


class Generation:
    """A request admitted to the engine: `await Generation.start(...)` tokenises and validates it
    off the event loop and counts it against the queue bound (APIError 400 / 429 / 503), then
    `outputs()` streams it; `release()` is idempotent; `cut()` ends it at shutdown. Its tokens are
    charged to the API key named `key` (the prompt once admitted, completion tokens as generated)."""

    def __init__(self, state: ServerState, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 key: str | None = None):
        self.state, self.request_id, self.params, self.prompt_ids = state, request_id, params, prompt_ids
        self.llm = state.ready()
        self.key = key
        self._released, self._cut = False, False
        state.admit(params.n, self)
        self._charge(len(prompt_ids))

    @classmethod
    async def start(cls, state: ServerState, request_id: str, prompt: str | list[int],
                    params: SamplingParams, key: str | None = None) -> "Generation":
        """Tokenise in a worker thread (a 10 MB prompt takes seconds), then admit."""
        llm = state.ready()
        try:
            ids = await asyncio.to_thread(_prepare, llm, prompt, params)
        except ValueError as e:
            raise bad_value(e) from None
        return cls(state, request_id, ids, params, key)

    def _charge(self, tokens: int) -> None:
        if self.key is not None:
            self.state.limiter.charge(self.key, tokens)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.state.release(self.params.n, self)

    def cut(self) -> None:
        """Shutdown ran out of time: abort in the engine; the consumer gets APIError 503."""
        self._cut = True
        asyncio.ensure_future(self.llm.abort(self.request_id))

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs; past its deadline the request ends with finish_reason "timeout"; a
        choice that ended with "error" raises APIError 500. Leaving the loop early (disconnect,
        cancel) aborts the request in the engine."""
        m, timeout = self.state.metrics, self.state.cfg.request_timeout
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        agen = self.llm.generate(self.prompt_ids, self.params, self.request_id)
        last: RequestOutput | None = None
        last_t, reason, charged = None, "abort", 0
        try:
            while True:
                try:
                    if deadline is None:
                        out = await agen.__anext__()
                    else:
                        out = await asyncio.wait_for(agen.__anext__(), max(0.0, deadline - time.monotonic()))
                except StopAsyncIteration:
                    if self._cut:           # abort() ended the engine's stream before its next output
                        reason = "shutdown"
                        raise _cut_error() from None
                    return
                except asyncio.TimeoutError:
                    reason = TIMEOUT
                    yield _timed_out(self.request_id, self.prompt_ids, self.params.n, last)
                    return
                if self._cut:
                    reason = "shutdown"
                    raise _cut_error()
                now = time.monotonic()
                if last_t is None:
                    first, arrival = out.metrics.get("first_token"), out.metrics.get("arrival")
                    if first is not None and arrival is not None:
                        m.ttft.observe(max(0.0, first - arrival))
                else:
                    m.itl.observe(now - last_t)
                last, last_t = out, now
                generated = sum(len(o.token_ids) for o in out.outputs)
                self._charge(generated - charged)
                charged = generated
                failed = next((o for o in out.outputs if o.finish_reason == "error"), None)
                if failed is not None:      # an error for the client, never an empty answer
                    reason = "error"
                    raise APIError(500, f"generation failed: {failed.error}", code="generation_failed")
                if out.finished:
                    reason = out.outputs[0].finish_reason or "stop"
                    m.e2e.observe(now - (out.metrics.get("arrival") or start))
                    m.prompt_len.observe(len(out.prompt_token_ids))
                yield out
                if out.finished:
                    return
        finally:
            await agen.aclose()
            self.release()
            m.success.labels(finished_reason=reason).inc()

    async def final(self) -> RequestOutput:
        """Run to the end and return the last output."""
        last = None
        async for out in self.outputs():
            last = out
        assert last is not None
        return last


def _cut_error() -> APIError:
    return APIError(503, "the server shut down before this request finished", code="server_shutdown")


def request_key(request: Request) -> str | None:
    """The name of the API key the request came with (AccessMiddleware puts it in the scope)."""
    return request.scope.get("state", {}).get("api_key")


def _prepare(llm, prompt: str | list[int], params: SamplingParams) -> list[int]:
    """The prompt's token ids (ValueError on a bad prompt); runs in a worker thread."""
    if isinstance(prompt, str) and has_lone_surrogate(prompt):
        raise ValueError("prompt: not valid Unicode: a lone surrogate (\\ud800-\\udfff) "
                         "cannot be encoded as UTF-8")
    return llm.engine.prepare(prompt, params)[1]


def _timed_out(request_id: str, prompt_ids: list[int], n: int, last: RequestOutput | None) -> RequestOutput:
    """The last output with every unfinished choice ended by the timeout."""
    if last is None:
        outs = [CompletionOutput(index=i, token_ids=[], text="") for i in range(n)]
        last = RequestOutput(request_id=request_id, prompt_token_ids=prompt_ids, outputs=outs)
    outs = [o if o.finish_reason else replace(o, finish_reason=TIMEOUT) for o in last.outputs]
    return replace(last, outputs=outs, finished=True)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its generation) if the client goes away."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        request.scope.setdefault("state", {})["outcome"] = "client disconnected"
        raise APIError(499, "client disconnected", code="client_closed_request")
    return task.result()


KEEPALIVE = ": keep-alive\n\n"


async def with_keepalive(items: AsyncIterator[T], interval: float = 15.0) -> AsyncIterator[T | None]:
    """The items, with a None whenever `interval` seconds pass without one (time for an SSE
    comment that keeps proxies from closing an idle stream); waiting never cancels the source."""
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(items.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await items.aclose()


def sse(data: dict | str) -> str:
    """One server-sent event line pair."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class SSEResponse(StreamingResponse):
    """`text/event-stream` whose body iterator is always closed, so an abort always reaches the engine."""

    media_type = "text/event-stream"

    def __init__(self, content, request: Request, on_close: Callable[[], None] | None = None):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._scope_state = request.scope.setdefault("state", {})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            if self._on_close is not None:
                self._on_close()
            if not self._scope_state.get("stream_done"):
                self._scope_state.setdefault("outcome", "client disconnected")
