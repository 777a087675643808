"""A first-come, first-served lock: one request at a time per loaded model, in arrival order."""

from __future__ import annotations

import collections
import threading
from types import TracebackType


class FairLock:
    """Like ``threading.Lock`` but waiters get it in FIFO order.

    Not bound to a thread: a generator may acquire it in one thread and release it in
    another (a streaming server resumes generators from worker threads).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[object] = collections.deque()
        self._locked = False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = object()
        with self._cond:
            if not self._locked and not self._queue:
                self._locked = True
                return True
            if not blocking:
                return False
            self._queue.append(me)
            try:
                ok = self._cond.wait_for(
                    lambda: not self._locked and self._queue[0] is me,
                    timeout=None if timeout is None or timeout < 0 else timeout,
                )
            except BaseException:
                self._queue.remove(me)
                self._cond.notify_all()
                raise
            if not ok:
                self._queue.remove(me)
                self._cond.notify_all()
                return False
            self._queue.popleft()
            self._locked = True
            return True

    def release(self) -> None:
        with self._cond:
            if not self._locked:
                raise RuntimeError("release of an unlocked FairLock")
            self._locked = False
            self._cond.notify_all()

    def locked(self) -> bool:
        return self._locked

    @property
    def waiting(self) -> int:
        """How many callers are queued behind the current holder."""
        return len(self._queue)

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
