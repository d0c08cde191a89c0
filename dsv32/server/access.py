"""Who may do what, and the record of it: request id, API key (its name goes to the access log,
never the key), per-key limits on the generation routes, the body limit, and one access-log line
per request (ASGI, streaming-safe)."""
from __future__ import annotations

import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, BodyTooLarge, internal_error
from .keys import ApiKey
from .state import ServerState

access_log = logging.getLogger("dsv32.server.access")
# no key needed (`/metrics` too with --metrics-public); the chat page asks the user for one
OPEN_PATHS = frozenset({"/", "/static/tools.js", "/health", "/openapi.json", "/docs", "/redoc", "/favicon.ico"})
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/chat/completions", "/beta/chat/completions",
                              "/v1/completions", "/completions", "/beta/completions"})


class AccessMiddleware:
    """Request id, API key and per-key limits, body limit, one access-log line per request."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state
        self.open_paths = OPEN_PATHS | ({"/metrics"} if state.cfg.metrics_public else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex
        info = scope.setdefault("state", {})
        info["request_id"] = rid
        start, status, size, logged = time.perf_counter(), [0], [0], [False]
        path = scope.get("path", "")

        def log_once() -> None:
            if not logged[0]:
                logged[0] = True
                self._log(scope, path, status[0], size[0], time.perf_counter() - start, rid)

        async def send_logged(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body":
                size[0] += len(message.get("body", b""))
                if not message.get("more_body", False):
                    log_once()     # before the last byte goes: a client never outruns its log line
            await send(message)

        try:
            await self._dispatch(scope, _limited(receive, self.state.cfg.max_body_bytes), send_logged)
        except Exception as exc:
            if status[0]:        # the answer has started: the server's own handler logs the rest
                raise
            error = self._too_large() if isinstance(exc, BodyTooLarge) else \
                internal_error(exc, scope.get("method"), path)
            await error.response()(scope, receive, send_logged)
        finally:
            log_once()           # an answer cut short (client gone) never sent its last byte

    def _log(self, scope: Scope, path: str, status: int, size: int, seconds: float, rid: str) -> None:
        """The access-log line (client, key name or `-`, request, status, bytes, seconds, request id)
        and the http metric of one request."""
        info = scope.get("state", {})
        outcome = info.get("outcome", "")
        access_log.info('%s %s "%s %s" %d %dB %.3fs %s%s', _client(scope), info.get("api_key") or "-",
                        scope.get("method"), path, status, size, seconds, rid, f" ({outcome})" if outcome else "")
        self.state.metrics.http.labels(path=_route(path), status=str(status)).inc()

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self._key(scope)
        if key is not None:
            scope["state"]["api_key"] = key.name
        if key is None and self.state.keys.required and not self._open(scope):
            await APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key").response(headers={"WWW-Authenticate": "Bearer"})(
                scope, receive, send)
        elif _content_length(scope) > self.state.cfg.max_body_bytes:
            await self._too_large().response()(scope, receive, send)
        elif key is not None and scope.get("method") == "POST" and scope.get("path") in GENERATION_PATHS:
            await self._within_limits(key, scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _within_limits(self, key: ApiKey, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request on one of the key's slots (held until the answer's last byte, streams
        included), or answer 429."""
        try:
            self.state.limiter.acquire(key)
        except APIError as e:
            scope["state"]["outcome"] = e.code
            self.state.metrics.rate_limited.labels(key=key.name, limit=e.code).inc()
            await e.response()(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.limiter.release(key)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body over {self.state.cfg.max_body_bytes >> 20} MiB",
                        code="request_too_large")

    def _open(self, scope: Scope) -> bool:
        return scope.get("path") in self.open_paths or scope.get("method") == "OPTIONS"

    def _key(self, scope: Scope) -> ApiKey | None:
        """The key the request carries (`Authorization: Bearer KEY` or `x-api-key`), if it is one of
        ours; the key compares as UTF-8 bytes, as a client sends a non-ASCII key."""
        if not self.state.keys.required:
            return None
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"").strip()
        return self.state.keys.find(given) if given else None


def _limited(receive: Receive, limit: int) -> Receive:
    """`receive` that raises BodyTooLarge once the body passes `limit` bytes: a chunked upload has
    no Content-Length to check up front."""
    total = 0

    async def receive_limited() -> Message:
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > limit:
                raise BodyTooLarge(limit)
        return message

    return receive_limited


def _route(path: str) -> str:
    """The metrics label of a path: known routes, `/v1/models/{id}`, else "other" (bounded)."""
    if path in _KNOWN_PATHS:
        return path
    for prefix in ("/v1/models/", "/models/"):
        if path.startswith(prefix):
            return prefix + "{id}"
    return "other"


def _content_length(scope: Scope) -> int:
    for name, value in scope.get("headers") or []:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


_KNOWN_PATHS = GENERATION_PATHS | {"/", "/health", "/metrics", "/v1/models", "/models", "/openapi.json"}
