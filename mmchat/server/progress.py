"""Long operations that report progress (``/api/pull``, ``/api/create``), Ollama's way.

The work runs in a thread of its own and ``put``s status dicts; the handler answers with
NDJSON lines as they come (``stream``), or with the last status only. An exception before
any status is a proper HTTP error; later ones become an ``{"error": …}`` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from mmchat.server.errors import as_api_error, error_response

NDJSON = "application/x-ndjson"

Put = Callable[[Any], None]


def ndjson_line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


async def progress_response(
    path: str, *, stream: bool, name: str, work: Callable[[Put], None]
) -> Response:
    """Run ``work(put)`` in a thread named ``name`` and answer with what it puts."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    end = object()

    def put(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (server shutting down)
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def run() -> None:
        try:
            work(put)
        except BaseException as exc:
            put(exc)
        finally:
            put(end)

    threading.Thread(target=run, name=name, daemon=True).start()
    if not stream:
        last: Any = None
        while (item := await queue.get()) is not end:
            if isinstance(item, BaseException):
                return error_response(path, item)
            last = item
        return JSONResponse(last or {"status": "success"})
    first = await queue.get()
    if first is end:
        return JSONResponse({"status": "success"})
    if isinstance(first, BaseException):
        return error_response(path, first)

    async def lines() -> AsyncIterator[bytes]:
        item = first
        while item is not end:
            if isinstance(item, BaseException):
                yield ndjson_line({"error": as_api_error(item).message})
            else:
                yield ndjson_line(item)
            item = await queue.get()

    return StreamingResponse(lines(), media_type=NDJSON)
