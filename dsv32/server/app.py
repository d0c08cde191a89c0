"""The FastAPI application: routes, and the model loaded in the background (`/health` answers 503
until it is ready). Keys, limits and the access log are AccessMiddleware's (access.py)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response

from dsv32.engine.engine import LLMEngine

from .access import AccessMiddleware
from .errors import APIError, install_handlers
from .metrics import CONTENT_TYPE
from .protocol import (
    ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ErrorResponse, ModelCard, ModelList,
)
from .serving_chat import ChatServing, ProcessorHook
from .serving_completions import CompletionServing
from .state import ServerConfig, ServerState

STATIC = Path(__file__).parent / "static"
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 422, 429, 503)}


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

    @app.get("/static/tools.js", include_in_schema=False)
    async def tools_js():
        return FileResponse(STATIC / "tools.js", media_type="text/javascript")

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health():
        """200 once the model is loaded, 503 before (or when loading failed)."""
        state.ready()
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response)
    async def metrics():
        """Prometheus text exposition (behind the API key unless --metrics-public)."""
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
