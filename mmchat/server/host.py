"""``HostedModel``: a loaded model in a child process, for ``mmchat serve --rpc``.

llama.cpp aborts the process that owns a context when an RPC worker dies mid-computation;
nothing in that process can catch it. With ``--rpc`` the server therefore keeps each model
in a child process of its own (spawned, so it shares no llama.cpp state with the server)
which attaches the workers, loads the model and streams the runtime's events back over a
pipe. If the child dies, the reply in flight ends with one clear error, the model counts as
unloaded, and the next request loads it again (probing the workers first: while one is
down that request gets a clear error too). The server itself never stops.

The proxy offers what the server uses of a ``LoadedModel``: ``session()`` (whose
``reply``/``infill``/``cancel`` run in the child), ``lock``, ``closed``, ``close()``,
``n_ctx``, ``options``, ``describe()``, ``load_ms``. Requests to one model run one at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import queue
import threading
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from mmchat.errors import UserError
from mmchat.runtime.lock import FairLock

LOAD_TIMEOUT_S = 600.0


class ModelProcessLost(UserError):
    """The model's process ended (llama.cpp aborted it, e.g. an RPC worker went away)."""


class HostedModel:
    """A ``LoadedModel`` living in a child process (see the module docstring)."""

    hosted = True
    n_seq = 1

    def __init__(
        self,
        model: Path,
        mmproj: Path | None,
        options: Any,
        *,
        template: str | None = None,
        endpoints: Sequence[str] = (),
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        opts = dataclasses.replace(options, n_parallel=1, scheduled=False)
        self.options = opts
        self._proc = ctx.Process(
            target=_host_main,
            args=(child, str(model), str(mmproj) if mmproj else None, opts, template),
            kwargs={"endpoints": list(endpoints)},
            name="mmchat-model-host",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self.lock = FairLock()
        self._closed = False
        if not self._conn.poll(LOAD_TIMEOUT_S):
            self._kill()
            raise UserError(f"loading {Path(model).name} took longer than {LOAD_TIMEOUT_S:.0f} s")
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            self._kill()
            raise ModelProcessLost(
                f"the process loading {Path(model).name} ended (llama.cpp aborted it)"
            ) from None
        if kind != "ready":
            self._kill()
            raise payload
        self._facts: dict[str, Any] = payload
        self.load_ms = float(payload["load_ms"])

    # -- what the server reads --

    @property
    def closed(self) -> bool:
        return self._closed or not self._proc.is_alive()

    @property
    def n_ctx(self) -> int:
        return int(self._facts["n_ctx"])

    @property
    def has_vision(self) -> bool:
        return bool(self._facts["describe"].get("vision"))

    def describe(self) -> dict[str, Any]:
        return dict(self._facts["describe"])

    def activity(self) -> tuple[int, int] | None:
        return None  # one request at a time, queued on ``lock``

    def session(self, system: str | None = None, params: Any = None) -> HostedSession:
        return HostedSession(self, system, params)

    def close(self, *, timeout: float = 60.0) -> None:
        if self._closed:
            return
        if not self.lock.acquire(timeout=timeout):
            raise RuntimeError("the model is busy with a request; it cannot be closed now")
        try:
            self._closed = True
            with contextlib.suppress(OSError, EOFError):
                self._conn.send(("close",))
            self._proc.join(timeout=10)
            self._kill()
        finally:
            self.lock.release()

    def _kill(self) -> None:
        self._closed = True
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(timeout=10)
        self._conn.close()

    # -- one request --

    def run(self, request: tuple[Any, ...], cancel: threading.Event) -> Generator[Any, None, None]:
        """Send ``request`` and yield the child's events until its reply is done."""
        with self.lock:
            if self.closed:
                raise ModelProcessLost("the model's process has ended; send the request again")
            self._conn.send(request)
            finished = False
            try:
                while True:
                    if cancel.is_set():
                        self._conn.send(("cancel",))
                        cancel.clear()
                    if not self._conn.poll(0.05):
                        if not self._proc.is_alive():
                            raise self._lost()
                        continue
                    try:
                        kind, payload = self._conn.recv()
                    except (EOFError, OSError):
                        raise self._lost() from None
                    if kind == "event":
                        yield payload
                    elif kind == "raise":
                        finished = True
                        raise payload
                    else:  # "done"
                        finished = True
                        return
            finally:
                if not finished and not self.closed:  # the consumer stopped reading
                    self._drain()

    def _drain(self) -> None:
        try:
            self._conn.send(("cancel",))
            while self._conn.poll(30):
                kind, _ = self._conn.recv()
                if kind in ("done", "raise"):
                    return
        except (OSError, EOFError):
            pass
        self._kill()

    def _lost(self) -> ModelProcessLost:
        code = self._proc.exitcode
        self._kill()
        return ModelProcessLost(
            "the model's process ended during this reply "
            f"(exit {code}: llama.cpp aborted it, e.g. an RPC worker went away); "
            "the reply is lost; the next request loads the model again"
        )


class HostedSession:
    """What ``ChatSession`` offers the server, run in the model's process."""

    def __init__(self, model: HostedModel, system: str | None, params: Any) -> None:
        self.model = model
        self.system = system
        self.params = params
        self.messages: list[Any] = []
        self._cancel = threading.Event()

    def reply(self, *, params: Any = None) -> Generator[Any, None, None]:
        p = params or self.params
        return self.model.run(("reply", self.system, list(self.messages), p, None), self._cancel)

    def infill(self, prefix: str, suffix: str, *, params: Any = None) -> Generator[Any, None, None]:
        p = params or self.params
        request: tuple[Any, ...] = ("reply", self.system, [], p, (prefix, suffix))
        return self.model.run(request, self._cancel)

    def cancel(self) -> None:
        self._cancel.set()


# --- the child process ------------------------------------------------------------------


def _host_main(
    conn: Any,
    model: str,
    mmproj: str | None,
    options: Any,
    template: str | None,
    *,
    endpoints: list[str],
) -> None:
    """Attach the workers, load the model, then answer requests until "close"."""
    try:
        if endpoints:
            from mmchat.runtime import rpc

            rpc.attach(rpc.parse_endpoints(",".join(endpoints)))
        from mmchat.runtime import load_model

        lm = load_model(model, mmproj, options, template=template)
    except BaseException as exc:
        conn.send(("error", _picklable(exc)))
        return
    facts = {"load_ms": lm.load_ms, "n_ctx": lm.n_ctx, "describe": lm.describe()}
    conn.send(("ready", facts))
    requests: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
    current: dict[str, Any] = {}

    def reader() -> None:  # "cancel" acts at once, while a reply runs
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                requests.put(("close",))
                return
            if msg[0] == "cancel":
                session = current.get("session")
                if session is not None:
                    session.cancel()
            else:
                requests.put(msg)
                if msg[0] == "close":
                    return

    threading.Thread(target=reader, daemon=True).start()
    while True:
        msg = requests.get()
        if msg[0] == "close":
            lm.close()
            return
        _, system, messages, params, infill = msg
        session = lm.session(system=system, params=params)
        session.messages = list(messages)
        current["session"] = session
        try:
            events = (
                session.infill(*infill, params=params)
                if infill is not None
                else session.reply(params=params)
            )
            for ev in events:
                conn.send(("event", ev))
            conn.send(("done", None))
        except BaseException as exc:
            conn.send(("raise", _picklable(exc)))
        finally:
            current.pop("session", None)


def _picklable(exc: BaseException) -> BaseException:
    """What crosses the pipe for ``exc``: a plain ``UserError`` with its message (subclasses
    may not rebuild from their args), a ``KeyboardInterrupt`` (a cancelled reply), or a
    ``RuntimeError`` with the text of anything else."""
    if isinstance(exc, KeyboardInterrupt):
        return KeyboardInterrupt()
    if isinstance(exc, UserError):
        return UserError(str(exc))
    return RuntimeError(f"{type(exc).__name__}: {exc}")
