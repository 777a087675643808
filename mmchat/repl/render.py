"""How a streamed reply is shown.

- ``PlainStream``: tokens written as they come. With ``wordwrap`` (on a terminal) a word that
  would cross the right edge starts a new line instead of being split. On a terminal,
  control characters in the reply are dropped (a model could emit escape sequences); when
  stdout is not a terminal the reply's own text is written as it is, with no escape codes
  added.
- ``MarkdownStream``: Markdown rendered live with rich. The reply is re-rendered as it grows;
  lines that have scrolled above the live window are printed for good and the last screenful
  stays live, so long replies neither flicker nor get duplicated.

``make_stream`` picks one; ``format_stats`` is the ``--verbose`` report.
"""

from __future__ import annotations

import io
import re
import time
from typing import IO, Any, Protocol, cast

from rich.console import Console
from rich.text import Text

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """``text`` without control characters (escape sequences, bells, backspaces...) that a
    model could emit and that would move the cursor or change the terminal's state."""
    return _CONTROL.sub("", text)


class ReplyStream(Protocol):
    def feed(self, text: str) -> None: ...

    def finish(self) -> None:
        """The reply is complete: show all of it and end the line."""

    def abort(self) -> None:
        """The reply was stopped: keep what was shown, end the line."""


class WordWrapper:
    """Breaks streamed text at spaces so words are not split at the right edge."""

    def __init__(self, width: int) -> None:
        self.width = max(int(width), 10)
        self.column = 0
        self.word = ""  # the partial word not yet written
        self.space = ""  # whitespace pending before the word

    def feed(self, text: str) -> str:
        out: list[str] = []
        for ch in text:
            if ch == "\n":
                if self.word:
                    out.append(self._place())
                out.append("\n")
                self.space = ""
                self.column = 0
            elif ch in " \t":
                if self.word:
                    out.append(self._place())
                self.space += ch
            else:
                self.word += ch
                if len(self.word) >= self.width:  # longer than a line: let it break
                    out.append(self._place())
        return "".join(out)

    def _place(self) -> str:
        need = len(self.space) + len(self.word)
        if self.column and self.column + need > self.width:
            piece = "\n" + self.word
            self.column = len(self.word)
        else:
            piece = self.space + self.word
            self.column += need
        self.word = ""
        self.space = ""
        return piece

    def flush(self) -> str:
        return self._place() if self.word else ""


class PlainStream:
    """The reply as plain text, written straight to ``file``."""

    def __init__(
        self, file: IO[str], *, wordwrap_width: int | None = None, sanitize: bool = False
    ) -> None:
        self.file = file
        self.sanitize = sanitize
        self.wrapper = WordWrapper(wordwrap_width) if wordwrap_width else None
        self.ended_with_newline = True
        self.wrote = False

    def _write(self, text: str) -> None:
        if not text:
            return
        self.file.write(text)
        self.file.flush()
        self.wrote = True
        self.ended_with_newline = text.endswith("\n")

    def feed(self, text: str) -> None:
        if self.sanitize:
            text = terminal_safe(text)
        self._write(self.wrapper.feed(text) if self.wrapper else text)

    def finish(self) -> None:
        if self.wrapper:
            self._write(self.wrapper.flush())
        if not self.ended_with_newline:
            self._write("\n")

    abort = finish


class MarkdownStream:
    """Markdown rendered live on a terminal console."""

    def __init__(self, console: Console, *, min_interval: float = 0.05) -> None:
        from rich.live import Live

        self.console = console
        self.text = ""
        self.printed = 0  # rendered lines already printed for good
        self.min_interval = min_interval
        self._last = 0.0
        self.live = Live(
            Text(""),
            console=console,
            auto_refresh=False,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.live.start()

    def _lines(self) -> list[str]:
        from rich.markdown import Markdown

        buf = io.StringIO()
        cap = Console(
            file=buf,
            width=self.console.width,
            force_terminal=True,
            color_system=cast(Any, self.console.color_system or "standard"),
            highlight=False,
        )
        cap.print(Markdown(self.text))
        lines = buf.getvalue().split("\n")
        while lines and not Text.from_ansi(lines[-1]).plain.strip():
            lines.pop()
        return lines

    def _show(self, final: bool) -> None:
        lines = self._lines()
        window = max(self.console.height - 2, 4)
        stable = len(lines) if final else max(len(lines) - window, 0)
        if stable > self.printed:
            for line in lines[self.printed : stable]:
                self.live.console.print(Text.from_ansi(line), soft_wrap=True)
            self.printed = stable
        self.live.update(Text.from_ansi("\n".join(lines[self.printed :])), refresh=True)

    def feed(self, text: str) -> None:
        self.text += terminal_safe(text)
        now = time.monotonic()
        if now - self._last >= self.min_interval:
            self._last = now
            self._show(final=False)

    def finish(self) -> None:
        try:
            self._show(final=True)
        finally:
            self.live.stop()

    def abort(self) -> None:
        self.finish()


def make_stream(
    console: Console, *, markdown: bool, wordwrap: bool, file: IO[str] | None = None
) -> ReplyStream:
    """The right stream for ``console``: live Markdown only on a terminal."""
    if markdown and console.is_terminal:
        return MarkdownStream(console)
    width = console.width if (wordwrap and console.is_terminal) else None
    return PlainStream(file or console.file, wordwrap_width=width, sanitize=console.is_terminal)


def format_stats(stats: Any) -> list[str]:
    """The ``--verbose`` lines for one reply (a ``mmchat.runtime.Stats``)."""

    def rate(n: float, ms: float) -> str:
        return f"{n / (ms / 1000):.2f} tokens/s" if ms > 0 else "-"

    lines = [f"total duration:       {stats.total_ms:.1f} ms"]
    if stats.images:
        lines.append(
            f"image encode:         {stats.image_encode_ms:.1f} ms "
            f"({stats.images_encoded} of {stats.images} image(s) encoded, the rest cached)"
        )
    lines.append(
        f"prompt eval:          {stats.prompt_eval_tokens} token(s) in "
        f"{stats.prompt_eval_ms:.1f} ms, {rate(stats.prompt_eval_tokens, stats.prompt_eval_ms)}"
        f" ({stats.cached_tokens} reused from cache)"
    )
    lines.append(
        f"eval:                 {stats.generated_tokens} token(s) in {stats.eval_ms:.1f} ms, "
        f"{rate(stats.generated_tokens, stats.eval_ms)}"
    )
    lines.append(f"time to first token:  {stats.ttft_ms:.1f} ms")
    return lines
