"""The FastAPI application: routers, middleware (auth, body limit), JSON error handlers.

``create_app(manager)`` returns the ASGI app; ``mmchat serve`` runs it with uvicorn.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmchat import __version__
from mmchat.errors import UserError
from mmchat.server import completions_api, embed_api, files_api, ollama_api, openai_api
from mmchat.server.errors import ApiError, as_api_error, error_body, error_bytes
from mmchat.server.limits import BodyLimitMiddleware, Limits
from mmchat.server.models import ModelManager
from mmchat.server.state import ServerState

log = logging.getLogger("mmchat.server")

OPEN_PATHS = frozenset({"/"})  # reachable without the API key (a liveness check)


class BearerAuthMiddleware:
    """ASGI middleware: every request but ``GET /`` needs ``Authorization: Bearer <key>``."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = b""
        for key, value in scope.get("headers") or []:
            if key.lower() == b"authorization":
                given = value
                break
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if given:
            message = "invalid API key"
        else:
            message = "this server needs an API key: Authorization: Bearer <key>"
        body = error_bytes(path, 401, message, "invalid_api_key")
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _describe_validation(exc: RequestValidationError) -> str:
    errors = list(exc.errors())
    if not errors:
        return "invalid request"
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error") or err.get("msg", "")
            return f"malformed JSON in the request body: {detail}"
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if not loc and err.get("type") == "missing":
        return "the request needs a JSON body"
    where = ".".join(loc) if loc else "body"
    more = ""
    if len(errors) > 1:
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return f"invalid request: {where}: {err.get('msg', 'invalid value')}{more}"


def create_app(
    manager: ModelManager | None = None,
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """The HTTP API over ``manager`` (a fresh ``ModelManager`` by default)."""
    mgr = manager or ModelManager()
    lim = limits or Limits()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        mgr.start()
        try:
            files_api.sweep_stale_temporaries(mgr.store)
        except Exception:  # never keep the server from starting
            log.exception("cleaning up stale upload files failed")
        try:
            yield
        finally:
            mgr.close()

    app = FastAPI(
        title="mmchat",
        version=__version__,
        summary="Ollama- and OpenAI-compatible API for local multimodal models",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.mmchat = ServerState(mgr, lim)
    app.include_router(ollama_api.router)
    app.include_router(openai_api.router)
    app.include_router(embed_api.router)
    app.include_router(completions_api.router)
    app.include_router(files_api.router)

    @app.get("/", response_class=PlainTextResponse, summary="Liveness check")
    def root() -> str:
        return "mmchat is running"

    @app.get("/health", summary="Readiness and load (for load balancers)")
    def health() -> dict[str, Any]:
        return mgr.load_report()

    @app.head("/", include_in_schema=False)
    def root_head() -> PlainTextResponse:
        return PlainTextResponse("")

    def _json(request: Request, status: int, message: str, code: str | None = None) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, status, message, code), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json(request, 400, _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail) if exc.detail else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        response = _json(request, exc.status_code, message)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return _json(request, exc.status, exc.message, exc.code)

    @app.exception_handler(UserError)
    async def _user(request: Request, exc: UserError) -> JSONResponse:
        err = as_api_error(exc)
        return _json(request, err.status, err.message, err.code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        err = as_api_error(exc)
        return _json(request, err.status, err.message, err.code)

    app.add_middleware(BodyLimitMiddleware, max_bytes=lim.max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuthMiddleware, api_key=api_key)
    return app
