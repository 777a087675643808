"""Request limits: body size (HTTP 413), images per request (400), pixels per image (413),
texts per embedding request and prompts per completion request (400), uploaded blob size.

The body limit is enforced by :class:`BodyLimitMiddleware` before any JSON is parsed: a
``Content-Length`` over the limit is refused at once, and a chunked body is counted while
it is read (blob uploads under ``/api/blobs/`` are streamed to disk by their handler,
which enforces ``max_blob_bytes``). The middleware also reads the whole body up front (it
is bounded) so that a request without a JSON ``Content-Type`` (``curl -d``) is still
parsed as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmchat.server.errors import ApiError, error_bytes

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGES = 16
DEFAULT_MAX_INPUTS = 256  # texts in one embedding request
DEFAULT_MAX_PROMPTS = 16  # prompts in one /v1/completions request
DEFAULT_MAX_BLOB_BYTES = 256 * 1024**3  # one uploaded model file (/api/blobs)
BLOB_PATH_PREFIX = "/api/blobs/"  # uploads stream to disk: not read by BodyLimitMiddleware
MAX_DRAIN_BYTES = 1024 * 1024 * 1024  # past this, a refused upload is cut off

Scope = dict[str, Any]
Message = dict[str, Any]


@dataclass(frozen=True)
class Limits:
    """What one request may carry. ``max_image_pixels`` None: ``MMCHAT_MAX_IMAGE_PIXELS``."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_images: int = DEFAULT_MAX_IMAGES
    max_image_pixels: int | None = None
    max_inputs: int = DEFAULT_MAX_INPUTS
    max_prompts: int = DEFAULT_MAX_PROMPTS
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES

    def check_count(self, n: int, limit: int, what: str) -> None:
        if n > limit:
            raise ApiError(
                400, f"the request has {n} {what}; at most {limit} are allowed per request"
            )

    def check_image_count(self, n: int) -> None:
        if n > self.max_images:
            raise ApiError(
                400,
                f"the request has {n} images; at most {self.max_images} are allowed per request",
                code="too_many_images",
            )


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"


class BodyLimitMiddleware:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413 and a JSON error body."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or str(scope.get("path", "")).startswith(BLOB_PATH_PREFIX):
            await self.app(scope, receive, send)  # (blob uploads enforce their own limit)
            return
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _reply(send, path, 400, "invalid Content-Length header")
                return
            if declared > self.max_bytes:
                await _drain(receive)
                await _reply(send, path, 413, self._too_large(declared))
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await _drain(receive)
                await _reply(send, path, 413, self._too_large(None))
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and scope.get("method") in ("POST", "PUT", "DELETE", "PATCH"):
            scope = dict(scope)
            scope["headers"] = _json_content_type(scope.get("headers") or [])
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return dict(await receive())

        await self.app(scope, replay, send)

    def _too_large(self, declared: int | None) -> str:
        what = f" ({_mib(declared)})" if declared is not None else ""
        return (
            f"the request body{what} is larger than the limit of {_mib(self.max_bytes)} "
            "(mmchat serve --max-body-mb)"
        )


def _json_content_type(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Treat any body as JSON (Ollama does; ``curl -d`` sends a form content type)."""
    out = [(k, v) for k, v in headers if k.lower() != b"content-type"]
    out.append((b"content-type", b"application/json"))
    return out


async def _drain(receive: Any) -> None:
    """Read and discard the rest of a refused body, so that the client, which sends its
    whole body before it reads the answer, gets the 413 instead of a broken connection."""
    drained = 0
    while drained < MAX_DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _reply(send: Any, path: str, status: int, message: str) -> None:
    body = error_bytes(path, status, message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
