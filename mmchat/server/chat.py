"""One generation request: prepared and run in a worker thread, consumed asynchronously.

The worker thread does everything that blocks — resolving the model in the store,
decoding images, loading the model, waiting for its turn (the model's FIFO lock),
evaluating the prompt, sampling — and hands ``Token``/``Done`` events (or the exception
that stopped it) to the event loop through a locked deque: the worker wakes the loop only
when the loop may be waiting (one ``call_soon_threadsafe`` per batch, not per token), and
the loop takes every item that is already there without waiting (:meth:`Generation.ready`),
so tokens that pile up while the loop is busy go out in one write. The handler waits for the
first item before it answers, so an error that happens before any text (unknown model,
bad image, context overflow, load failure) is a proper HTTP status with a JSON body; later
errors go into the stream.

Stopping: when the client goes away, :meth:`Generation.cancel` asks the session to stop at
the next token and the worker closes the reply generator; the runtime keeps the model
consistent and releases its lock, so the next request works. Each request builds its
session from the messages it brings (stateless, like Ollama's API); the model's KV-cache
prefix reuse makes a repeated conversation prefix, images included, cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from mmchat.server.errors import ApiError
from mmchat.server.models import UNSET, KeepAlive, Lease, ModelManager

log = logging.getLogger("mmchat.server")

# The threads that run requests (reused: starting a thread per request costs the event loop
# a wait for the thread to start). A request holds one while it waits for its model, so
# this also bounds how many requests can queue inside the server at once.
MAX_WORKERS = 64
WORKERS = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="mmchat-request")


@dataclass
class Prepared:
    """What a request asks for, validated and decoded (images are ``PreparedImage``s)."""

    record: Any
    messages: list[Any]  # mmchat.runtime.Message, the last one the user's
    system: str | None
    params: Any  # mmchat.runtime.SamplingParams
    num_ctx: int | None = None
    keep_alive_s: KeepAlive = UNSET
    load_only: bool = False
    infill: tuple[str, str] | None = None
    """Fill in the middle (prefix, suffix) instead of replying to ``messages``."""


@dataclass
class Loaded:
    """The request only loaded (or unloaded) the model."""

    load_ms: float
    unloaded: bool


@dataclass
class _End:
    pass


Item = Any  # Token | ContextTrimmed | Done | Loaded | BaseException | _End


@dataclass
class Generation:
    manager: ModelManager
    prepare: Callable[[], Prepared]
    stream: bool = True
    """False: only the final ``Done`` crosses to the event loop, not every token."""
    t_start: float = field(default_factory=time.perf_counter)
    prepared: Prepared | None = None
    load_ms: float = 0.0
    _items: deque[Item] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _signalled: bool = False  # a wake-up of the loop is scheduled (guarded by _lock)
    _wakeup: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _session: Any = None
    _finished: bool = False

    # ------------------------------------------------------------------ worker side
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        WORKERS.submit(self._run)

    def _put(self, *items: Item) -> None:
        """Hand ``items`` to the loop; wake it only if no wake-up is pending already."""
        assert self._loop is not None and self._wakeup is not None
        with self._lock:
            self._items.extend(items)
            if self._signalled:
                return
            self._signalled = True
        with contextlib.suppress(RuntimeError):  # the loop is gone (server shutting down)
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def _run(self) -> None:
        from mmchat.runtime import Done

        lease: Lease | None = None
        prepared: Prepared | None = None
        done: Done | None = None
        try:
            prepared = self.prepare()
            self.prepared = prepared
            if self._stop.is_set():
                return
            if getattr(prepared.record, "is_embedding", False) and not prepared.load_only:
                raise ApiError(
                    400,
                    f"{prepared.record.name} is an embedding model: it does not generate text "
                    "(use /api/embed or /v1/embeddings)",
                )
            if prepared.load_only and prepared.keep_alive_s == 0:
                # an unload request (``mmchat stop``): never load a model only to unload it
                self.manager.unload(prepared.record.name)
                self._put(Loaded(0.0, unloaded=True))
                return
            lease = self.manager.acquire(
                prepared.record, num_ctx=prepared.num_ctx, keep_alive_s=prepared.keep_alive_s
            )
            self.load_ms = lease.load_ms
            if prepared.load_only:
                entry = lease.entry
                self.manager.release(lease, prepared.keep_alive_s)
                lease = None
                self._put(Loaded(self.load_ms, unloaded=not self.manager.is_loaded(entry.name)))
                return
            session = lease.model.session(system=prepared.system, params=prepared.params)
            session.messages = list(prepared.messages)
            self._session = session
            if self._stop.is_set():
                return
            if prepared.infill is not None:
                reply = session.infill(*prepared.infill, params=prepared.params)
            else:
                reply = session.reply(params=prepared.params)
            try:
                for event in reply:
                    if isinstance(event, Done):  # sent once the model is released (below)
                        done = event
                        continue
                    if not self.stream:
                        continue
                    self._put(event)
                    if self._stop.is_set():
                        break
            finally:
                reply.close()
        except KeyboardInterrupt:  # the session noticed cancel(): the client is gone
            pass
        except BaseException as exc:
            if not self._stop.is_set():
                if not isinstance(exc, Exception) or _is_internal(exc):
                    log.exception("request failed")
                self._put(exc)
        finally:
            if lease is not None:
                keep = prepared.keep_alive_s if prepared is not None else UNSET
                try:
                    self.manager.release(lease, keep)
                except Exception:  # pragma: no cover
                    log.exception("releasing the model failed")
            # The reply's last event goes out only now: a client that saw it can rely on the
            # model being free again (and unloaded already, with keep_alive 0).
            if done is not None:
                self._put(done, _End())
            else:
                self._put(_End())

    # ------------------------------------------------------------------ loop side
    def cancel(self) -> None:
        """Stop generating (safe to call from the event loop at any time)."""
        self._stop.set()
        session = self._session
        if session is not None:
            session.cancel()

    def _pop(self) -> tuple[bool, Item]:
        """(True, item) if one is there; else (False, None), and the next put wakes us."""
        assert self._wakeup is not None
        with self._lock:
            if self._items:
                return True, self._items.popleft()
            self._signalled = False
            self._wakeup.clear()
        return False, None

    def ready(self) -> bool:
        """True if :meth:`next` would return at once (an item is already there)."""
        with self._lock:
            return bool(self._items) or self._finished

    async def _get(self) -> Item:
        assert self._wakeup is not None
        while True:
            found, item = self._pop()
            if found:
                return item
            await self._wakeup.wait()

    async def next(self, request: Request | None = None) -> Item:
        """The next item; with ``request``, cancel and return ``_End`` if the client leaves."""
        if self._finished:
            return _End()
        found, item = self._pop()  # one already there: no waiting, no disconnect watcher
        if found:
            pass
        elif request is None:
            item = await self._get()
        else:
            getter = asyncio.ensure_future(self._get())
            watcher = asyncio.ensure_future(_wait_disconnect(request))
            try:
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watcher.cancel()
                if not getter.done():
                    getter.cancel()
            if getter in done and not getter.cancelled():
                item = getter.result()
            else:
                self.cancel()
                self._finished = True
                return _End()
        if isinstance(item, _End):
            self._finished = True
        return item

    def cancel_unless_finished(self) -> None:
        """For a consumer's ``finally``: stop the work unless it already ended."""
        if not self._finished:
            self.cancel()

    def elapsed_ns(self) -> int:
        return int((time.perf_counter() - self.t_start) * 1e9)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _is_internal(exc: BaseException) -> bool:
    from mmchat.errors import UserError

    return not isinstance(exc, UserError | ApiError)


def is_end(item: Item) -> bool:
    return isinstance(item, _End)


async def stream_batched(
    gen: Generation,
    first: Item,
    encode: Callable[[Item], list[bytes]],
    prefix: Iterable[bytes] = (),
) -> AsyncIterator[bytes]:
    """The body of a streamed reply: ``encode`` turns each item (a Token, the Done, or an
    exception, which ends the stream) into wire bytes; the encodings of items that are
    already waiting go out together, one write instead of one each."""
    item = first
    batch = list(prefix)
    try:
        while not is_end(item):
            batch.extend(encode(item))
            if isinstance(item, BaseException):
                break
            if batch and not gen.ready():
                yield b"".join(batch)
                batch = []
            item = await gen.next()
        if batch:
            yield b"".join(batch)
    finally:
        gen.cancel_unless_finished()
