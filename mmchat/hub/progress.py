"""How a pull reports what it is doing: a no-op base, and rich progress bars for the CLI.

The HTTP server can subclass :class:`PullProgress` to stream the same events as JSON.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any


class PullProgress:
    """Receives pull events; every method is a no-op here."""

    def message(self, text: str) -> None:
        """A one-line status ("waiting for another pull of ...")."""

    def start(self, label: str, total: int | None, done: int = 0) -> None:
        """A file transfer (or verification pass) begins; ``done`` bytes are already there."""

    def advance(self, n: int) -> None:
        """``n`` more bytes arrived (negative to roll back after a restart)."""

    def finish(self, ok: bool = True) -> None:
        """The current file is complete (or failed)."""

    def close(self) -> None:
        """No more events."""

    def __enter__(self) -> PullProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RichPullProgress(PullProgress):
    """One rich progress bar per file: name, bar, size, speed, ETA (on stderr)."""

    def __init__(self, console: Any = None) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        if console is None:
            from mmchat.console import err

            console = err
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task: Any = None
        self._started = False

    def message(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def start(self, label: str, total: int | None, done: int = 0) -> None:
        if not self._started:
            self.progress.start()
            self._started = True
        self._task = self.progress.add_task(label, total=total, completed=done)

    def advance(self, n: int) -> None:
        if self._task is not None:
            self.progress.advance(self._task, n)

    def finish(self, ok: bool = True) -> None:
        if self._task is not None:
            task = next(t for t in self.progress.tasks if t.id == self._task)
            if ok and task.total is not None:
                self.progress.update(self._task, completed=task.total)
            self.progress.stop_task(self._task)
            self._task = None

    def close(self) -> None:
        if self._started:
            self.progress.stop()
            self._started = False
