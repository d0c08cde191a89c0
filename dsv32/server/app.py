"""The FastAPI application: routes, API keys, access log, and the model loaded in the background
(`/health` answers 503 until it is ready)."""
from __future__ import annotations

import contextlib
import hmac
import logging
import time
import uuid
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsv32.engine.engine import LLMEngine

from .errors import APIError, BodyTooLarge, install_handlers, internal_error
from .metrics import CONTENT_TYPE
from .protocol import (
    ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ErrorResponse, ModelCard, ModelList,
)
from .serving_chat import ChatServing, ProcessorHook
from .serving_completions import CompletionServing
from .state import ServerConfig, ServerState

access_log = logging.getLogger("dsv32.server.access")
STATIC = Path(__file__).parent / "static"
_OPEN_PATHS = ("/", "/health", "/metrics", "/openapi.json", "/docs", "/redoc", "/favicon.ico")
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 422, 429, 503)}


class AccessMiddleware:
    """Request id, API-key check and one access-log line per request (ASGI, streaming-safe)."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state
        self.keys = [key.encode("utf-8") for key in state.cfg.api_keys]

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
        """The access-log line and the http metric of one request."""
        outcome = scope.get("state", {}).get("outcome", "")
        access_log.info('%s "%s %s" %d %dB %.3fs %s%s', _client(scope), scope.get("method"), path,
                        status, size, seconds, rid, f" ({outcome})" if outcome else "")
        self.state.metrics.http.labels(path=_route(path), status=str(status)).inc()

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._authorized(scope):
            await APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key").response(headers={"WWW-Authenticate": "Bearer"})(
                scope, receive, send)
        elif _content_length(scope) > self.state.cfg.max_body_bytes:
            await self._too_large().response()(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body over {self.state.cfg.max_body_bytes >> 20} MiB",
                        code="request_too_large")

    def _authorized(self, scope: Scope) -> bool:
        """The key compares as UTF-8 bytes, as a client sends a non-ASCII key."""
        if not self.keys or scope.get("path") in _OPEN_PATHS or scope.get("method") == "OPTIONS":
            return True
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"").strip()
        return any(hmac.compare_digest(given, key) for key in self.keys)


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


_KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/models", "/models", "/v1/chat/completions",
                "/chat/completions", "/beta/chat/completions", "/v1/completions", "/completions",
                "/beta/completions", "/openapi.json"}


def _model_cards(state: ServerState) -> dict[str, ModelCard]:
    """id -> card; max_model_len is known once the model is loaded."""
    max_len = state.llm.engine.max_model_len if state.llm else None
    return {name: ModelCard(id=name, created=state.created, root=state.cfg.engine.model, max_model_len=max_len,
                            thinking=thinking)
            for name, thinking in state.model_ids().items()}


def create_app(cfg: ServerConfig, engine_factory: Callable[[], LLMEngine] | None = None,
               extra_processors: ProcessorHook | None = None) -> FastAPI:
    """The app; the engine is built by `engine_factory` (default: from cfg.engine) in a background
    thread at startup. `extra_processors` (tests) adds logits processors to chat requests."""
    state = ServerState(cfg, engine_factory)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading()
        yield
        state.shutdown()

    app = FastAPI(title="dsv32", version="0.1.0", lifespan=lifespan,
                  description="OpenAI- and DeepSeek-compatible API for DeepSeek-V3.2")
    app.state.server = state
    install_handlers(app)
    app.add_middleware(AccessMiddleware, state=state)
    chat, completions = ChatServing(state, extra_processors), CompletionServing(state)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health():
        """200 once the model is loaded, 503 before (or when loading failed)."""
        state.ready()
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response)
    async def metrics():
        """Prometheus text exposition."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    @app.get("/models", include_in_schema=False)
    async def models():
        """The served model and its aliases deepseek-chat (thinking off) and deepseek-reasoner (on)."""
        return ModelList(data=list(_model_cards(state).values()))

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
    @app.get("/models/{model_id:path}", include_in_schema=False)
    async def model(model_id: str):
        """One model card (ids may contain `/`); 404 for an id this server does not serve."""
        card = _model_cards(state).get(model_id)
        if card is None:
            raise APIError(404, f"model {model_id!r} does not exist; available: {', '.join(state.model_ids())}",
                           param="model", code="model_not_found")
        return card

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
    @app.post("/chat/completions", include_in_schema=False)
    @app.post("/beta/chat/completions", include_in_schema=False)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Chat completion (JSON, or server-sent events with `stream`)."""
        return await chat(body, request)

    @app.post("/v1/completions", response_model=Completion, responses=_ERRORS)
    @app.post("/completions", include_in_schema=False)
    @app.post("/beta/completions", include_in_schema=False)
    async def text_completions(body: CompletionRequest, request: Request):
        """Text completion; fill-in-the-middle when `suffix` is given."""
        return await completions(body, request)

    return app
