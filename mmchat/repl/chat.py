"""The conversation loop's logic, independent of how lines are read.

``Chat.handle(line)`` takes one submitted input (a message or a slash command), does what it
says and returns an ``Outcome``: go on, keep the typed text for editing (after an error,
nothing was sent), or exit. ``mmchat.repl.app`` reads lines with prompt_toolkit and calls
it; tests call it directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from mmchat.errors import UserError
from mmchat.repl.imagepaths import ImageMention, find_images
from mmchat.repl.render import format_stats, make_stream

if TYPE_CHECKING:
    from mmchat.repl.loader import ModelSource
    from mmchat.runtime.events import Done
    from mmchat.runtime.model import LoadedModel
    from mmchat.runtime.options import LoadOptions
    from mmchat.runtime.session import ChatSession
    from mmchat.vision import PreparedImage
    from mmchat.vision.audio import PreparedAudio


class Outcome(Enum):
    OK = "ok"
    """Done; the next prompt starts empty."""
    KEEP = "keep"
    """Nothing was sent: give the typed text back for editing."""
    EXIT = "exit"


@dataclass
class Display:
    """How replies are shown (``/set verbose|quiet``, ``markdown|plain``, ``wordwrap``)."""

    verbose: bool = False
    markdown: bool = True
    wordwrap: bool = True


@dataclass
class Attached:
    image: PreparedImage | PreparedAudio
    """An image or an audio clip."""
    display: str
    tokens: int

    @property
    def is_audio(self) -> bool:
        return getattr(self.image, "kind", "") == "audio"


ModelOpener = Callable[[str, "str | None"], "tuple[ModelSource, LoadedModel]"]
"""Loads a model by name or path (and an optional mmproj path) for ``/load``."""


@dataclass
class Chat:
    """One interactive conversation with a loaded model."""

    model: LoadedModel
    session: ChatSession
    out: Console
    err: Console
    name: str = "model"
    display: Display = field(default_factory=Display)
    max_image_pixels: int | None = None
    opener: ModelOpener | None = None
    load_options: LoadOptions | None = None
    exists: Callable[[str], bool] = os.path.exists
    notices: Console | None = None
    """Where attach notices and hints go (default ``out``; stderr in one-shot mode)."""
    pending: list[Attached] = field(default_factory=list)
    """Images attached (``/image``, or a message that was only paths) awaiting a question."""
    last_error: str | None = None
    interrupted: bool = False

    # -- messages to the user --

    def error(self, message: str) -> None:
        self.last_error = message
        self.err.print(f"Error: {message}", style="bold red", markup=False, soft_wrap=True)

    def note(self, message: str) -> None:
        (self.notices or self.out).print(message, style="dim", markup=False, soft_wrap=True)

    def say(self, message: str) -> None:
        self.out.print(message, markup=False, soft_wrap=True, highlight=False)

    def inform(self, message: str) -> None:
        """A plain notice (attached images) on the notices console."""
        (self.notices or self.out).print(message, markup=False, soft_wrap=True, highlight=False)

    # -- input --

    def handle(self, line: str) -> Outcome:
        """Act on one submitted input."""
        self.last_error = None
        self.interrupted = False
        text = line.strip()
        if not text:
            return Outcome.OK
        if text.startswith('"""'):
            text = strip_triple_quotes(text)
        elif text.startswith("/") and not _is_path_like(text):
            from mmchat.repl.commands import run_command

            return run_command(self, text)
        try:
            return self.message(text)
        except UserError as exc:
            self.error(str(exc))
            return Outcome.KEEP

    def message(self, text: str) -> Outcome:
        """A chat message, possibly naming images: attach them, then send the rest."""
        parsed = find_images(text, exists=self.exists)
        if not parsed.ok:
            for m in parsed.missing:
                self.error(f"No such file: {m.display}")
            for m in parsed.urls:
                self.error(
                    f"mmchat does not download images: {m.display} "
                    "(save it and give the file's path)"
                )
            if parsed.missing:
                self.note(
                    "Nothing was sent. To write a file name without attaching it, "
                    "put it in backticks: `image.png`"
                )
            return Outcome.KEEP
        images = self.attach(parsed.images)
        if images is None:
            return Outcome.KEEP
        if not parsed.text:
            self.pending.extend(images)
            if images:
                self.note("Ask a question about the image (it is sent with your next message).")
            return Outcome.OK
        return self.send(parsed.text, [*self.pending, *images])

    def attach(
        self, mentions: tuple[ImageMention, ...] | list[ImageMention]
    ) -> list[Attached] | None:
        """Load the images and audio clips; print ``Added image ...`` for each, or errors
        and return None (nothing is sent)."""
        if not mentions:
            return []
        if any(not m.is_audio for m in mentions) and not self.model.has_vision:
            self.error("this model cannot see images")
            return None
        if any(m.is_audio for m in mentions) and not self.model.has_audio:
            self.error("this model cannot hear audio")
            return None
        out: list[Attached] = []
        failed = False
        seen: dict[str, Attached] = {}
        for m in mentions:
            try:
                media = (
                    self.load_audio(m.path, m.display)
                    if m.is_audio
                    else self.load_image(m.path, m.display)
                )
                if media.digest in seen:
                    continue
                tokens = self._tokens(media)
            except UserError as exc:
                self.error(str(exc))
                failed = True
                continue
            att = Attached(media, m.display, tokens)
            seen[media.digest] = att
            out.append(att)
        if failed:
            self.note("Nothing was sent.")
            return None
        for att in out:
            if att.is_audio:
                self.inform(f"Added audio '{att.display}' ({att.tokens} tokens)")
            else:
                w, h = att.image.width, att.image.height  # type: ignore[union-attr]
                grid = getattr(self.model.vision, "describe", None)  # tiled engines (NVLM-D)
                tiles = f", {grid(att.image)}" if callable(grid) else ""
                self.inform(f"Added image '{att.display}' ({w}×{h}{tiles}, {att.tokens} tokens)")
        return out

    def _tokens(self, media: Any) -> int:
        """KV cells the media item takes (its rows and the engine's wrapper tokens)."""
        from mmchat.vision.layout import TextSpan, layout_cells

        vision = self.model.vision
        if hasattr(vision, "layout"):
            layout = tuple(vision.layout(media))
            # a closing tag the runtime tokenizes with the following text costs tokens too
            glued = sum(
                len(self.model.tokenize(s.text))
                for s in layout
                if isinstance(s, TextSpan) and s.text
            )
            return layout_cells(layout) + glued
        return int(vision.tokens_for(media))

    def load_audio(self, path: str, display: str) -> PreparedAudio:
        """Read an audio file; errors name it as the user wrote it."""
        from mmchat.vision.audio import load_audio

        full = os.path.abspath(os.path.expanduser(path))
        try:
            clip = load_audio(full)
        except UserError as exc:
            raise type(exc)(str(exc).replace(full, display)) from None
        return replace(clip, source=full)

    def load_image(self, path: str, display: str) -> PreparedImage:
        """Read an image; errors name it as the user wrote it, history keeps the full path."""
        from mmchat.vision import load_image

        full = os.path.abspath(os.path.expanduser(path))
        try:
            img = load_image(full, max_pixels=self.max_image_pixels)
        except UserError as exc:
            raise type(exc)(str(exc).replace(full, display)) from None
        return replace(img, source=full)

    # -- replies --

    def send(self, text: str, attached: list[Attached]) -> Outcome:
        """Send a message and stream the reply. Ctrl-C stops the reply, keeps the session."""
        from mmchat.runtime.events import ContextTrimmed, Done, Token

        images = [a.image for a in attached]
        try:
            events = self.session.send(text, images)
        except UserError as exc:
            self.error(str(exc))
            return Outcome.KEEP
        stream = None
        done: Done | None = None
        try:
            for ev in events:
                if isinstance(ev, Token):
                    if stream is None:
                        stream = self._stream()
                    stream.feed(ev.text)
                elif isinstance(ev, ContextTrimmed):
                    self.note(ev.message)
                elif isinstance(ev, Done):
                    done = ev
        except KeyboardInterrupt:
            _close(events)
            if stream is not None:
                stream.abort()
            self.pending.clear()
            self.interrupted = True
            self.note("(stopped)")
            return Outcome.OK
        except UserError as exc:
            _close(events)
            if stream is not None:
                stream.abort()
            self.error(str(exc))
            return Outcome.OK if stream is not None else Outcome.KEEP
        self.pending.clear()
        if stream is None:
            stream = self._stream()
        stream.finish()
        if done is not None:
            if done.done_reason == "length":
                self.note("(the reply reached the token limit)")
            if self.display.verbose:
                for ln in format_stats(done.stats):
                    self.err.print(ln, style="dim", markup=False, highlight=False, soft_wrap=True)
        return Outcome.OK

    def _stream(self) -> Any:
        return make_stream(self.out, markdown=self.display.markdown, wordwrap=self.display.wordwrap)

    # -- model switching (``/load``) --

    def switch_model(self, ref: str, mmproj: str | None = None) -> None:
        if self.opener is None:
            raise UserError("/load is not available here")
        source, model = self.opener(ref, mmproj)
        old_model, old_session = self.model, self.session
        session = model.session(system=old_session.system, params=old_session.params)
        data = old_session.export()
        kept = True
        if old_session.messages:
            try:
                session.load(data, load_image=self._reload_image)
            except UserError as exc:
                kept = False
                self.note(f"Started a new conversation ({exc}).")
        self.model, self.session, self.name = model, session, source.name
        self.pending.clear()
        old_model.close()
        vision = "with vision" if model.has_vision else "text only"
        extra = f", {len(session.messages)} messages kept" if kept and session.messages else ""
        self.say(f"Loaded {source.name} ({vision}{extra})")

    def _reload_image(self, path: str) -> Any:
        from mmchat.vision import load_image

        return load_image(path, max_pixels=self.max_image_pixels)


def strip_triple_quotes(text: str) -> str:
    """The text of a ``\"\"\"...\"\"\"`` block without its fences."""
    body = text[3:]
    if body.rstrip().endswith('"""'):
        body = body.rstrip()[:-3]
    return body.strip("\n").strip()


def _is_path_like(text: str) -> bool:
    """``/home/me/a.png what is it`` is a message, not a command."""
    first = text.split(maxsplit=1)[0]
    return "/" in first[1:] or (len(first) > 1 and Path(first).exists())


def _close(events: Any) -> None:
    close = getattr(events, "close", None)
    if close is not None:
        close()
