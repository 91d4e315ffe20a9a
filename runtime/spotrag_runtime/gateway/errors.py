"""Every error the gateway answers, in OpenAI's error shape, from one builder.

    APIError                    (any status; the base)
    ├── InvalidRequest          400 invalid_request_error
    │   └── ContextTooLong      400 invalid_request_error, code context_length_exceeded
    ├── AuthenticationFailed    401 authentication_error, code invalid_api_key
    ├── NotFound                404 invalid_request_error (unknown model or path)
    ├── RequestTooLarge         413 invalid_request_error, code request_too_large
    ├── QueueFull               429 rate_limit_error, with Retry-After
    ├── ClientClosedRequest     499 the client went away first (nobody reads it)
    ├── EngineRejected          the engine's own 4xx, passed on
    ├── EnginesFailed           502 server_error: every attempt failed
    └── Unavailable             503 service_unavailable (no engine in time, index not loaded)

Validation errors from FastAPI and Starlette's HTTP errors go through the same
builder (``install_error_handlers``), and so does an error that happens after a
stream has started: it is sent as one SSE event, then ``[DONE]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_event(self) -> bytes:
        """The error as it is sent inside a stream that already started."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\ndata: [DONE]\n\n"


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class ContextTooLong(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"


class RequestTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class QueueFull(APIError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class ClientClosedRequest(APIError):
    status = 499
    type = "client_closed_request"


class EngineRejected(APIError):
    """An engine refused the request itself (a 4xx): retrying elsewhere would not help."""

    type = "invalid_request_error"


class EnginesFailed(APIError):
    status = 502
    type = "server_error"
    code = "engines_failed"


class Unavailable(APIError):
    status = 503
    type = "service_unavailable"


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _describe_validation_error(error: dict[str, Any]) -> tuple[str, str | None]:
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if error.get("type") == "json_invalid":
        detail = error.get("ctx", {}).get("error", "")
        return f"The request body is not valid JSON: {detail}".rstrip(": "), None
    message = error.get("msg", "invalid value")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI, *, on_error: Callable[[Request, Exception], None] | None = None) -> None:
    """Answer every error in OpenAI's shape; ``on_error`` sees each one (for metrics)."""

    def seen(request: Request, error: Exception) -> None:
        if on_error is not None:
            on_error(request, error)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        seen(request, error)
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [_describe_validation_error(e) for e in error.errors()]
        message = "; ".join(text for text, _ in problems) or "invalid request"
        api_error = InvalidRequest(message, param=problems[0][1] if problems else None)
        seen(request, api_error)
        return api_error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            return NotFound(f"No such endpoint: {request.method} {request.url.path}").response()
        if error.status_code == 413:  # the body limit, hit while the body was being read
            too_large = RequestTooLarge(str(error.detail))
            seen(request, too_large)
            return too_large.response()
        api_error = APIError(str(error.detail), status=error.status_code, headers=dict(error.headers or {}))
        api_error.type = "invalid_request_error" if error.status_code < 500 else "server_error"
        return api_error.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        # A bug in the gateway, not the client's fault: 500, and the traceback in the log.
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        seen(request, error)
        return APIError("The gateway failed to handle this request; see its log.").response()
