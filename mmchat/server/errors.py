"""Errors of the HTTP API and their JSON bodies (Ollama's and OpenAI's shapes).

``/api/*`` answers ``{"error": "<message>"}`` (what the ``ollama`` client reads);
``/v1/*`` answers ``{"error": {"message", "type", "param", "code"}}`` (what the ``openai``
client reads). Every error the server sends, from a handler or a middleware, goes through
:func:`error_body`.
"""

from __future__ import annotations

import json
from typing import Any

from mmchat.errors import NotFoundError, UserError

OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """An error with an HTTP status, raised anywhere while handling a request."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_body(path: str, status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """The JSON error body for a request to ``path``."""
    if is_openai_path(path):
        return {
            "error": {
                "message": message,
                "type": OPENAI_TYPES.get(status, "invalid_request_error"),
                "param": None,
                "code": code,
            }
        }
    return {"error": message}


def error_bytes(path: str, status: int, message: str, code: str | None = None) -> bytes:
    return json.dumps(error_body(path, status, message, code)).encode()


def as_api_error(exc: BaseException) -> ApiError:
    """Map any exception from the library to an HTTP status and a message fit to show."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NotFoundError):
        return ApiError(404, str(exc), code="model_not_found")
    if isinstance(exc, UserError):
        from mmchat.runtime.parallel import QueueFullError
        from mmchat.vision import ImageTooLargeError

        if isinstance(exc, QueueFullError):
            retry = {"Retry-After": str(exc.retry_after_s)}
            return ApiError(503, str(exc), code="server_busy", headers=retry)

        status = 413 if isinstance(exc, ImageTooLargeError) else 400
        return ApiError(status, str(exc))
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}")


def error_response(path: str, exc: BaseException) -> Any:
    """The ``JSONResponse`` for ``exc`` on a request to ``path`` (status, body, headers)."""
    from fastapi.responses import JSONResponse

    err = as_api_error(exc)
    return JSONResponse(
        error_body(path, err.status, err.message, err.code),
        status_code=err.status,
        headers=err.headers or None,
    )
