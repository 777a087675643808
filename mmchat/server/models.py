"""The model manager: load on first use, share while busy, unload after keep-alive.

- One ``LoadedModel`` per store name, reloaded (once the requests holding it are done)
  when the store's content for the name changes or a request needs another context size:
  its ``num_ctx``, else the model's stored ``num_ctx``, else the server's ``--ctx``.
- Requests to a loaded model are answered by the model's ``BatchScheduler``: ``parallel``
  at once (continuous batching over that many sequences; 1: one at a time), the rest in
  a bounded FIFO queue. ``parallel=None`` picks it per model from the model's size, the
  context and the free memory (``mmchat.runtime.parallel``).
- ``keep_alive`` (Ollama's semantics): after a request the model stays loaded that long;
  0 unloads it as soon as it is idle, a negative value keeps it loaded. A background
  thread (the reaper) unloads idle models whose time is up. A model is never closed while
  a request holds it.
- At most ``max_loaded`` models stay loaded: loading another first unloads the least
  recently used idle one.
- The vision engine (and its image-embedding cache) belongs to the loaded model, so every
  request to that model shares it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mmchat.errors import UserError
from mmchat.server.errors import ApiError

log = logging.getLogger("mmchat.server")

DEFAULT_MAX_LOADED = 3
REAP_INTERVAL_S = 0.25
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

Loader = Callable[..., Any]


class Unset:
    """The type of :data:`UNSET` (keep-alive not given: use the default)."""


UNSET = Unset()
KeepAlive = float | Unset | None


def parse_keep_alive(value: float | int | str | None, default: float | None) -> float | None:
    """Seconds a model stays loaded after a request; ``None`` means forever.

    Accepts Ollama's forms: a number of seconds, a Go-style duration (``"5m"``,
    ``"1h30m"``, ``"90s"``, ``"-1m"``), or a number in a string. Negative: forever.
    """
    if value is None or value == "":
        return default
    seconds: float
    if isinstance(value, bool):
        raise ApiError(400, f"keep_alive must be a duration like '5m' or seconds, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            pos = 0
            total = 0.0
            for m in _DURATION.finditer(body):
                if m.start() != pos:
                    break
                total += float(m.group(1)) * _UNIT_S[m.group(2)]
                pos = m.end()
            if pos != len(body) or not body:
                raise ApiError(
                    400,
                    f"keep_alive must be a duration like '5m', '1h30m', '90s' or a number of "
                    f"seconds, got {value!r}",
                ) from None
            seconds = sign * total
    if math.isnan(seconds):
        raise ApiError(400, "keep_alive must be a number of seconds or a duration, not NaN")
    return None if seconds < 0 or math.isinf(seconds) else seconds


@dataclass
class Entry:
    """A loaded model and its bookkeeping (guarded by the manager's condition)."""

    name: str
    record: Any  # mmchat.store.ModelRecord
    model: Any  # mmchat.runtime.LoadedModel
    n_ctx: int | None
    load_ms: float
    active: int = 0
    keep_alive_s: float | None = 300.0
    expires_at: float | None = None  # time.monotonic(); None: never
    expires_wall: float | None = None  # time.time() of the same moment, for /api/ps
    last_used: float = field(default_factory=time.monotonic)
    unload_when_idle: bool = False
    embedder: Any = None  # mmchat.runtime.embedding.Embedder, made on the first embedding

    def set_expiry(self, keep_alive_s: float | None) -> None:
        self.keep_alive_s = keep_alive_s
        if keep_alive_s is None:
            self.expires_at = self.expires_wall = None
        else:
            self.expires_at = time.monotonic() + keep_alive_s
            self.expires_wall = time.time() + keep_alive_s


@dataclass
class Lease:
    """A request's hold on a loaded model; give it back with ``ModelManager.release``."""

    entry: Entry
    load_ms: float  # 0 when the model was already loaded

    @property
    def model(self) -> Any:
        return self.entry.model


class ModelManager:
    """Loads models from the store on first use and unloads them when idle.

    ``loader`` defaults to ``mmchat.runtime.load_model``; ``load_options`` are the base
    ``LoadOptions`` for every model (``n_ctx`` is taken from the request's ``num_ctx``, else
    the model's stored ``num_ctx`` parameter, else the runtime's default).
    """

    def __init__(
        self,
        *,
        keep_alive_s: float | None = None,
        max_loaded: int = DEFAULT_MAX_LOADED,
        load_options: Any = None,
        loader: Loader | None = None,
        store: Any = None,
        parallel: int | None = 1,
    ) -> None:
        from mmchat.settings import load_settings

        settings = load_settings()
        self.parallel = parallel
        """Sequences per loaded model (``--parallel``); None: chosen per model."""
        self.default_keep_alive: float | None = (
            settings.keep_alive_s if keep_alive_s is None else keep_alive_s
        )
        if self.default_keep_alive is not None and self.default_keep_alive < 0:
            self.default_keep_alive = None
        self.max_loaded = max(1, max_loaded)
        self._load_options = load_options
        self._loader = loader
        self._store = store
        self._opened: Any = None  # the Store for the current MMCHAT_HOME (store=None)
        self._entries: dict[str, Entry] = {}
        self._cond = threading.Condition()
        self._load_lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        # (store home, name) -> (manifest path, its signature, record): see resolve()
        self._resolved: dict[tuple[str, str], tuple[Any, Any, Any]] = {}

    # ------------------------------------------------------------------ store
    @property
    def store(self) -> Any:
        if self._store is None:
            from mmchat.settings import load_settings
            from mmchat.store import Store

            home = load_settings().home  # read each time: MMCHAT_HOME may change (tests)
            opened = self._opened
            if opened is None or opened.home != Path(home).expanduser():
                opened = self._opened = Store(Path(home).expanduser())
            return opened
        return self._store

    def resolve(self, name: str) -> Any:
        """The store record for ``name`` (``NotFoundError`` → 404 naming it).

        The record is cached per store and name, keyed by the manifest file's identity
        (inode, size, mtime, ctime): a hit costs a ``stat`` of the manifest and of each
        blob (still checked on every request) instead of parsing the manifest again.
        """
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "model is required (a name from /api/tags)")
        key = name.strip()
        store = self.store
        cache_key = (str(store.home), key)
        hit = self._resolved.get(cache_key)
        if hit is not None:
            path, signature, record = hit
            if _file_signature(path) == signature and all(
                store.has_blob(part["digest"], part.get("size")) for part in record.parts.values()
            ):
                return record
        record = store.resolve(key)
        path = getattr(record, "manifest_path", None)
        signature = _file_signature(path) if path is not None else None
        if signature is not None:
            if len(self._resolved) >= 256:
                self._resolved.clear()
            self._resolved[cache_key] = (path, signature, record)
        return record

    # ------------------------------------------------------------------ lifetime
    def start(self) -> None:
        """Start the reaper thread (idempotent)."""
        if self._reaper is None or not self._reaper.is_alive():
            self._stop.clear()
            self._reaper = threading.Thread(
                target=self._reap_loop, name="mmchat-reaper", daemon=True
            )
            self._reaper.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the reaper and unload every model (waiting up to ``timeout`` for busy ones)."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=2.0)
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.wait_for(
                lambda: all(e.active == 0 for e in self._entries.values()),
                timeout=max(0.0, deadline - time.monotonic()),
            )
            idle = [e for e in self._entries.values() if e.active == 0]
            for e in idle:
                del self._entries[e.name]
        for e in idle:
            self._close(e)

    def _reap_loop(self) -> None:
        while not self._stop.wait(REAP_INTERVAL_S):
            try:
                self.reap()
            except Exception:  # pragma: no cover - never let the reaper die
                log.exception("unloading idle models failed")

    def reap(self) -> list[str]:
        """Unload idle models whose keep-alive has passed; return their names."""
        now = time.monotonic()
        with self._cond:
            due = [
                e
                for e in self._entries.values()
                if e.active == 0
                and (e.unload_when_idle or (e.expires_at is not None and e.expires_at <= now))
            ]
            for e in due:
                del self._entries[e.name]
        for e in due:
            self._close(e)
        return [e.name for e in due]

    def _close(self, entry: Entry) -> None:
        log.info("unloading %s", entry.name)
        try:
            if entry.embedder is not None:  # it uses the model's weights: freed first
                entry.embedder.close()
            entry.model.close()
        except Exception:  # pragma: no cover
            log.exception("closing %s failed", entry.name)

    # ------------------------------------------------------------------ leases
    def acquire(
        self,
        record: Any,
        *,
        num_ctx: int | None = None,
        keep_alive_s: KeepAlive = UNSET,
    ) -> Lease:
        """Hold the loaded model for ``record``, loading it first when needed (blocking).

        Call from a worker thread. Load failures are ``UserError``s (bad file) or other
        exceptions; nothing is left half-loaded.
        """
        keep = self.default_keep_alive if isinstance(keep_alive_s, Unset) else keep_alive_s
        want_ctx = num_ctx or _stored_num_ctx(record) or self._default_n_ctx()
        with self._cond:
            entry = self._usable(record, want_ctx)
            if entry is not None:
                entry.active += 1
                entry.set_expiry(keep)
                return Lease(entry, 0.0)
        with self._load_lock:
            stale: Entry | None = None
            with self._cond:
                entry = self._usable(record, want_ctx)
                if entry is not None:
                    entry.active += 1
                    entry.set_expiry(keep)
                    return Lease(entry, 0.0)
                stale = self._entries.get(record.name)
                if stale is not None:  # other content or another context size
                    stale.unload_when_idle = True
                    busy = stale
                    self._cond.wait_for(lambda: busy.active == 0)
                    # the last release (or the reaper) may have closed it meanwhile
                    if self._entries.get(record.name) is stale:
                        del self._entries[record.name]
                    else:
                        stale = None
            if stale is not None:
                self._close(stale)
            self._make_room()
            t0 = time.perf_counter()
            model = self._load(record, want_ctx)
            load_ms = (time.perf_counter() - t0) * 1000
            entry = Entry(record.name, record, model, want_ctx, load_ms)
            entry.active = 1
            entry.set_expiry(keep)
            with self._cond:
                self._entries[record.name] = entry
            return Lease(entry, load_ms)

    def _usable(self, record: Any, n_ctx: int | None) -> Entry | None:
        """The loaded entry for ``record`` if it can serve a request wanting ``n_ctx``."""
        entry = self._entries.get(record.name)
        if entry is None or entry.unload_when_idle or entry.model.closed:
            return None
        if entry.record.id != record.id:
            return None
        if n_ctx != entry.n_ctx and n_ctx != entry.model.n_ctx:
            return None
        return entry

    def _default_n_ctx(self) -> int | None:
        return getattr(self._load_options, "n_ctx", None)

    def release(self, lease: Lease, keep_alive_s: KeepAlive = UNSET) -> None:
        """Give a lease back; the model's keep-alive starts now."""
        entry = lease.entry
        keep = entry.keep_alive_s if isinstance(keep_alive_s, Unset) else keep_alive_s
        close = False
        with self._cond:
            entry.active -= 1
            entry.last_used = time.monotonic()
            entry.set_expiry(keep)
            if entry.active == 0 and (keep == 0 or entry.unload_when_idle):
                if self._entries.get(entry.name) is entry:
                    del self._entries[entry.name]
                close = True
            self._cond.notify_all()
        if close:
            self._close(entry)

    def _make_room(self) -> None:
        with self._cond:
            victims: list[Entry] = []
            idle = sorted(
                (e for e in self._entries.values() if e.active == 0), key=lambda e: e.last_used
            )
            while len(self._entries) - len(victims) >= self.max_loaded and idle:
                victims.append(idle.pop(0))
            for e in victims:
                del self._entries[e.name]
        for e in victims:
            self._close(e)

    def _load(self, record: Any, n_ctx: int | None) -> Any:
        from mmchat.runtime import LoadOptions

        options = self._load_options or LoadOptions()
        if n_ctx is not None:
            options = replace(options, n_ctx=n_ctx)
        parallel = self.parallel
        if parallel is None:
            from mmchat.runtime.parallel import auto_parallel

            parallel = auto_parallel(record.model_path, options.n_ctx, options.kv_cache_type)
        options = replace(options, n_parallel=max(1, parallel), scheduled=True)
        loader = self._loader
        if loader is None:
            from mmchat.runtime import load_model

            loader = load_model
        log.info("loading %s", record.name)
        try:
            return loader(record.model_path, record.mmproj_path, options, template=record.template)
        except UserError:
            raise
        except MemoryError as exc:
            raise UserError(f"not enough memory to load {record.name}: {exc}") from exc

    def unload(self, name: str) -> bool:
        """Unload ``name`` now if idle, else as soon as it is; True if it was loaded."""
        close: Entry | None = None
        with self._cond:
            entry = self._entries.get(name)
            if entry is None:
                return False
            entry.unload_when_idle = True
            if entry.active == 0:
                del self._entries[name]
                close = entry
        if close is not None:
            self._close(close)
        return True

    def embedder(self, lease: Lease) -> Any:
        """The leased model's ``Embedder`` (made on first use; closed with the model).

        Call with the model's lock held (``lease.model.lock``).
        """
        entry = lease.entry
        if getattr(entry.model, "hosted", False):
            raise ApiError(
                400,
                f"{entry.name} is served in a process of its own (serve --rpc): embeddings "
                "are not available for it",
            )
        if entry.embedder is None or entry.embedder.closed:
            from mmchat.runtime.embedding import open_embedder

            entry.embedder = open_embedder(entry.model)
        return entry.embedder

    # ------------------------------------------------------------------ reports
    def loaded(self) -> list[Entry]:
        """A snapshot of the loaded models, most recently used first."""
        with self._cond:
            entries = [e for e in self._entries.values() if not e.unload_when_idle]
        return sorted(entries, key=lambda e: e.last_used, reverse=True)

    def load_report(self) -> dict[str, Any]:
        """Readiness and load, for ``/health`` (a load balancer's view)."""
        models = []
        for e in self.loaded():
            activity = e.model.activity()  # (running, queued) when a scheduler serves it
            running, queued = activity or (min(e.active, 1), max(e.active - 1, 0))
            models.append(
                {
                    "name": e.name,
                    "parallel": int(getattr(e.model, "n_seq", 1)),
                    "requests": e.active,
                    "running": running,
                    "queued": queued,
                }
            )
        return {
            "status": "ok",
            "parallel": "auto" if self.parallel is None else self.parallel,
            "models": models,
            "requests": sum(m["requests"] for m in models),
        }

    def is_loaded(self, name: str) -> bool:
        with self._cond:
            return name in self._entries


def _file_signature(path: Any) -> tuple[int, int, int, int] | None:
    """What changes when a file is rewritten (in place or by rename); None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stored_num_ctx(record: Any) -> int | None:
    value = (getattr(record, "params", None) or {}).get("num_ctx")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


@contextlib.contextmanager
def leased(manager: ModelManager, record: Any, **kw: Any) -> Any:
    """``with leased(manager, record) as lease:`` (blocking; for scripts and tests)."""
    lease = manager.acquire(record, **kw)
    try:
        yield lease
    finally:
        manager.release(lease)
