"""Turning generated token bytes into streamed text: UTF-8-safe, with stop strings."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


def holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class ReplyText:
    """Accumulates a reply from token bytes and says what may be shown so far.

    - Bytes are decoded incrementally: a character split over several tokens is shown once
      complete (bytes that can never form valid UTF-8 become U+FFFD).
    - Leading whitespace of the reply is dropped (``strip_leading``).
    - A stop string ends the reply just before it; text that might be the start of a stop
      string is held back until the next bytes decide.
    """

    def __init__(self, stops: Sequence[str] = (), *, strip_leading: bool = True) -> None:
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = strip_leading
        self.text = ""
        """The reply so far (after a stop: up to the stop string)."""
        self.emitted = 0
        """How many characters of ``text`` were handed out by ``feed``/``finish``."""
        self.stopped = False

    def _add(self, chunk: str) -> None:
        if self._strip and not self.text:
            chunk = chunk.lstrip()
        self.text += chunk

    def _release(self, end: int) -> str:
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def feed(self, data: bytes) -> str:
        """Add one token's bytes; return the text that became safe to show (maybe "")."""
        if self.stopped:
            return ""
        self._add(self._decoder.decode(data))
        if self.stops:
            start = max(0, self.emitted - self._longest)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._release(len(self.text))
        return self._release(len(self.text) - holdback(self.text, self.stops))

    def finish(self) -> str:
        """The end of the reply: flush incomplete bytes and held-back text."""
        if not self.stopped:
            self._add(self._decoder.decode(b"", final=True))
        return self._release(len(self.text))

    @property
    def shown(self) -> str:
        """The part of the reply already handed out."""
        return self.text[: self.emitted]
