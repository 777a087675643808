"""Find image (and audio) paths typed (or dragged) into a chat message.

``find_images("What's in this? ./smile.png")`` returns the message without the path and the
images it names. Pure functions: the only I/O is the ``exists`` check, which callers (tests)
can replace.

What is recognised as a media path — a *word* whose value ends in an image extension
(``IMAGE_EXTENSIONS``) or an audio extension (``AUDIO_EXTENSIONS``: .wav, .mp3, .flac), any
case; audio paths follow exactly the same rules (``ImageMention.is_audio``):

- relative (``smile.png``, ``./a/b.png``, ``../x.jpg``), absolute and ``~/x.png`` words;
- words in single or double quotes (``'my photo.png'``), which may contain spaces; a quote
  only opens a quoted word at the start of a word, so apostrophes in prose stay prose;
- backslash escapes as terminals write them on drag-and-drop (``my\\ photo\\ \\(1\\).png``);
  backslashes are kept literally in Windows drive paths (``C:\\pics\\a.png``) and on Windows;
- ``file://`` URIs, percent-decoded (``file:///home/me/my%20photo.png``);
- punctuation that ends a sentence (``./a.png?``) is not part of the path unless a file by
  that exact name exists.

A word that looks like an image path but names no file is reported in ``missing``: the
caller must not send the message (``No such file: image.png``). A word written in backticks
(```image.png```) is prose, never a path. Web URLs are reported in ``urls``: mmchat does not
download images.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tiff",
    ".tif",
)

AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".mp3", ".flac")

_TRAILING_PUNCT = ".,;:!?)]}>"
_QUOTES = "'\""
_DRIVE = re.compile(r"[A-Za-z]:[\\/]")  # used with .match(text, pos): no "^"
_WEB = re.compile(r"^(https?|ftp)://", re.IGNORECASE)


@dataclass(frozen=True)
class ImageMention:
    """One image (or audio) path found in a message.

    ``display`` is the path as the user wrote it (quotes and escapes removed, ``~`` kept),
    for messages; ``path`` is what to open (``~`` expanded, URI decoded); ``start``/``end``
    delimit the characters of the message that named it. ``audio``: attach it as audio
    whatever its extension (``/audio``, ``--audio``).
    """

    display: str
    path: str
    start: int
    end: int
    audio: bool = False

    @property
    def is_audio(self) -> bool:
        """Attached as audio: asked for, or named with .wav, .mp3, .flac."""
        return self.audio or has_audio_extension(self.path)


@dataclass(frozen=True)
class ParsedMessage:
    """A message split into the text to send and the images it names."""

    text: str
    images: tuple[ImageMention, ...] = ()
    missing: tuple[ImageMention, ...] = ()
    urls: tuple[ImageMention, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the message may be sent (no missing file, no web URL)."""
        return not self.missing and not self.urls


@dataclass(frozen=True)
class _Word:
    raw: str  # the characters of the message
    value: str  # after quotes and escapes are resolved
    start: int
    end: int
    literal_tail: int  # how many trailing characters of value are also the raw tail


def has_image_extension(value: str) -> bool:
    """An image or audio extension (what makes a word a media path)."""
    low = value.lower()
    return any(
        low.endswith(ext) and len(low) > len(ext) for ext in IMAGE_EXTENSIONS + AUDIO_EXTENSIONS
    )


def has_audio_extension(value: str) -> bool:
    low = value.lower()
    return any(low.endswith(ext) and len(low) > len(ext) for ext in AUDIO_EXTENSIONS)


def _split_words(text: str, *, windows: bool) -> list[_Word]:
    """Shell-like words: whitespace separates words except inside quotes or after ``\\``."""
    words: list[_Word] = []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        start = i
        value: list[str] = []
        literal_tail = 0
        raw_backslash = windows or bool(_DRIVE.match(text, i))
        while i < n and not text[i].isspace():
            c = text[i]
            if c in _QUOTES and (i == start or text[i - 1] in _QUOTES):
                close = text.find(c, i + 1)
                inner = text[i + 1 : close] if close > 0 else ""
                if close < 0 or not has_image_extension(inner.rstrip(_TRAILING_PUNCT)):
                    # an unmatched quote, or quoted prose: an ordinary character
                    value.append(c)
                    literal_tail += 1
                    i += 1
                    continue
                value.append(inner)
                literal_tail = 0
                i = close + 1
                continue
            if c == "\\" and not raw_backslash and i + 1 < n:
                value.append(text[i + 1])
                literal_tail = 0
                i += 2
                continue
            value.append(c)
            literal_tail += 1
            i += 1
        words.append(_Word(text[start:i], "".join(value), start, i, literal_tail))
    return words


def _from_uri(value: str) -> str | None:
    """The filesystem path of a ``file:`` URI, or None when ``value`` is not one."""
    if not value.lower().startswith("file:"):
        return None
    parts = urlsplit(value)
    path = unquote(parts.path)
    if parts.netloc and parts.netloc.lower() != "localhost":
        path = f"//{parts.netloc}{path}"  # a UNC share: file://server/share/a.png
    if re.match(r"^/[A-Za-z]:[\\/]", path):  # file:///C:/pics/a.png
        path = path[1:]
    return path


def _candidates(word: _Word) -> list[tuple[str, int]]:
    """(value, characters cut from the raw end) for the word and its forms without trailing
    punctuation, longest first."""
    out = [(word.value, 0)]
    value = word.value
    cut = 0
    while value and value[-1] in _TRAILING_PUNCT and cut < word.literal_tail:
        value = value[:-1]
        cut += 1
        out.append((value, cut))
    return out


def find_images(
    text: str,
    *,
    exists: Callable[[str], bool] = os.path.exists,
    expanduser: Callable[[str], str] = os.path.expanduser,
    windows: bool = os.name == "nt",
) -> ParsedMessage:
    """Split ``text`` into the message to send and the image paths it names."""
    images: list[ImageMention] = []
    missing: list[ImageMention] = []
    urls: list[ImageMention] = []
    spans: list[tuple[int, int]] = []
    for word in _split_words(text, windows=windows):
        if word.raw.startswith("`"):
            continue  # `image.png` in backticks is prose
        found: ImageMention | None = None
        fallback: ImageMention | None = None
        is_url = False
        for value, cut in _candidates(word):
            display = value
            lead = 0
            if cut and value[:1] in "([<":
                # "(./a.png)": the opening bracket goes with the closing one that was cut
                display = value[1:]
                lead = 1
            if not has_image_extension(display) or "*" in display:
                continue
            if _WEB.match(display):
                is_url = True
                fallback = fallback or ImageMention(
                    display, display, word.start + lead, word.end - cut
                )
                break
            uri_path = _from_uri(display)
            if uri_path is not None:
                path = uri_path
                display = uri_path
            else:
                path = expanduser(display) if display.startswith("~") else display
            mention = ImageMention(display, path, word.start + lead, word.end - cut)
            if exists(path):
                found = mention
                break
            fallback = fallback or mention
        if found is not None:
            images.append(found)
            spans.append((found.start, found.end))
        elif fallback is not None:
            (urls if is_url else missing).append(fallback)
    return ParsedMessage(_remove_spans(text, spans), tuple(images), tuple(missing), tuple(urls))


def _remove_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` without the given spans, tidying the whitespace they leave behind."""
    out = text
    for start, end in sorted(spans, reverse=True):
        left, right = out[:start], out[end:]
        left_ws = len(left) - len(left.rstrip(" \t"))
        right_ws = len(right) - len(right.lstrip(" \t"))
        if left_ws and (right_ws or not right or right[0] in "\n\r" or right[0] in _TRAILING_PUNCT):
            left = left[: len(left) - left_ws] + (" " if right_ws and right.strip() else "")
            right = right[right_ws:]
        elif not left.strip(" \t") or left.endswith("\n"):
            right = right[right_ws:]
        out = left + right
    return out.strip()
