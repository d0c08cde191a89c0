"""Errors as `{"error": {"message", "type", "param", "code"}}` with the statuses of the API spec.

400 malformed request (bad JSON, wrong types, unknown role, bad tools, prompt over the context),
401 API key, 404 unknown model or route, 422 a value out of range, 429 queue full or a key's limit,
503 not ready.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dsv32.server")

# pydantic error types that mean "a value out of range" (422); every other one is a format error (400)
_VALUE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_long",
                 "too_short", "multiple_of", "finite_number", "value_error"}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "service_unavailable"}
_CODES = {413: "request_too_large"}
RETRY_AFTER_S = 2   # the Retry-After of every 429: about the time a queued request needs to start


class APIError(Exception):
    """An error answer: HTTP status, message, and the OpenAI `type`, `param` and `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, retry_after: int | None = None):
        message = _printable(message)      # it may quote the request, lone surrogates included
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.retry_after = retry_after     # seconds, for a 429 (default RETRY_AFTER_S)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        if self.status == 429:
            headers = {"Retry-After": str(self.retry_after or RETRY_AFTER_S), **(headers or {})}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class BodyTooLarge(HTTPException):
    """Raised while the body is read once it passes the limit (FastAPI passes HTTPExceptions on)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit >> 20} MiB")


def _printable(text: str) -> str:
    """The text with anything UTF-8 cannot encode (lone surrogates) escaped."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def internal_error(exc: Exception, method: str, path: str) -> APIError:
    """The 500 for an unexpected exception (call it in the `except` block: it logs the traceback)."""
    log.exception("internal error on %s %s", method, path)
    return APIError(500, f"internal server error: {type(exc).__name__}")


def param_of(message: str) -> str | None:
    """The field a `"field: why"` engine / sampling message names, if any."""
    head, sep, _ = message.partition(":")
    return head if sep and head.replace("_", "").replace(".", "").isalnum() else None


def bad_value(exc: ValueError, status: int = 400) -> APIError:
    """An engine or sampling ValueError ("field: why") as an API error."""
    message = str(exc)
    param = param_of(message)
    code = "context_length_exceeded" if "max_model_len" in message else None
    return APIError(status, message, param=param, code=code)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    status = 422 if errors and all(e.get("type") in _VALUE_ERRORS for e in errors) else 400
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        param = _printable(param or (loc[0] if loc else "")) or None
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return APIError(status, "; ".join(parts) or "invalid request", param=param,
                    code="invalid_value" if status == 422 else "invalid_format")


def install_handlers(app: FastAPI) -> None:
    """Route every error, FastAPI's own included, into the one error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return APIError(exc.status_code, message, code=_CODES.get(exc.status_code)).response(
            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):   # AccessMiddleware answers these first
        return internal_error(exc, request.method, request.url.path).response()
