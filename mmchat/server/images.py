"""Media in API requests: images as base64 (Ollama's ``images``) and data URIs (OpenAI's
``image_url``), audio as base64 (OpenAI's ``input_audio``).

The server never reads a file or fetches a URL that a request names: images arrive as bytes
only. ``file://`` and ``http(s)://`` URLs are refused with a message that says what to send
instead.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from mmchat.errors import UserError
from mmchat.server.errors import ApiError

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?),", re.I)
_WHITESPACE = re.compile(r"\s+")

SEND_BYTES = "send the image bytes base64-encoded"
SEND_DATA_URI = "send the image as a data URI (data:image/png;base64,...)"


@dataclass(frozen=True)
class RawImage:
    """Decoded media bytes and where they came from in the request (for messages);
    ``audio``: an audio clip (OpenAI ``input_audio``) rather than an image."""

    data: bytes
    where: str
    audio: bool = False


def decode_base64(value: str, where: str) -> bytes:
    """Ollama's image form: plain base64 (a data URI is accepted too)."""
    if not isinstance(value, str):
        raise ApiError(400, f"{where} must be a base64 string")
    text = value.strip()
    if text[:5].lower() == "data:":
        return decode_data_uri(text, where)
    _refuse_reference(text, where, SEND_BYTES)
    data = _b64(text, where)
    if data is None:
        if _looks_like_path(text):
            raise ApiError(
                400,
                f"{where} looks like a file path; the server never reads files named in a "
                f"request: {SEND_BYTES}",
            )
        raise ApiError(400, f"{where} is not valid base64 ({SEND_BYTES})")
    return data


def decode_image_url(url: str, where: str) -> bytes:
    """OpenAI's ``image_url.url``: only ``data:`` URIs."""
    text = url.strip() if isinstance(url, str) else ""
    if text[:5].lower() == "data:":
        return decode_data_uri(text, where)
    _refuse_reference(text, where, SEND_DATA_URI)
    raise ApiError(400, f"{where} is not a data URI: {SEND_DATA_URI}")


def decode_data_uri(uri: str, where: str) -> bytes:
    m = _DATA_URI.match(uri)
    if m is None:
        raise ApiError(400, f"{where} is a malformed data URI: {SEND_DATA_URI}")
    params = [p.strip().lower() for p in (m.group("params") or "").split(";") if p.strip()]
    payload = uri[m.end() :]
    if "base64" not in params:
        raise ApiError(400, f"{where} is a data URI without ';base64': {SEND_DATA_URI}")
    data = _b64(payload, where)
    if data is None:
        raise ApiError(400, f"{where} is a data URI whose payload is not valid base64")
    return data


def _b64(text: str, where: str) -> bytes | None:
    compact = _WHITESPACE.sub("", text)
    if not compact:
        raise ApiError(400, f"{where} is empty")
    if "-" in compact or "_" in compact:
        compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _refuse_reference(text: str, where: str, instead: str) -> None:
    low = text[:8].lower()
    if low.startswith("file:"):
        raise ApiError(
            400,
            f"{where} is a file:// URL; the server never reads files named in a request: {instead}",
            code="image_url_not_supported",
        )
    if low.startswith(("http://", "https://")):
        raise ApiError(
            400,
            f"{where} is a remote URL; the server does not download images: {instead}",
            code="image_url_not_supported",
        )


def _looks_like_path(text: str) -> bool:
    if len(text) > 4096:
        return False
    return (
        text.startswith(("./", "../", "~", "\\"))
        or bool(re.match(r"^[A-Za-z]:[\\/]", text))
        or bool(re.search(r"\.(png|jpe?g|gif|webp|bmp|tiff?)$", text, re.I))
    )


AUDIO_FORMATS = ("wav", "mp3", "flac")


def decode_input_audio(data: object, fmt: object, where: str) -> bytes:
    """OpenAI's ``input_audio``: base64 ``data`` and a ``format`` (wav, mp3; flac too)."""
    if fmt is not None and str(fmt).lower() not in AUDIO_FORMATS:
        raise ApiError(400, f"{where} has format {fmt!r}; mmchat takes wav, mp3 or flac")
    if not isinstance(data, str) or not data.strip():
        raise ApiError(400, f"{where} has no base64 'data'")
    text = data.strip()
    if text[:5].lower() == "data:":
        return decode_data_uri(text, where)
    _refuse_reference(text, where, "send the audio bytes base64-encoded")
    decoded = _b64(text, where)
    if decoded is None:
        raise ApiError(400, f"{where} is not valid base64 (send the audio bytes base64-encoded)")
    return decoded


def prepare(images: list[RawImage], max_pixels: int | None) -> list[Any]:
    """Decode every image (``PreparedImage``) and check every audio clip
    (``PreparedAudio``), in request order.

    CPU work: call it from a worker thread. A bad input is a ``UserError`` naming it.
    """
    from mmchat.vision import load_image
    from mmchat.vision.audio import load_audio

    out: list[Any] = []
    for img in images:
        try:
            if img.audio:
                out.append(load_audio(img.data))
            else:
                out.append(load_image(img.data, max_pixels=max_pixels))
        except UserError as exc:
            label = f"<{len(img.data)} bytes>"
            text = str(exc)
            if label in text:
                text = text.replace(label, f"{img.where} ({len(img.data)} bytes)", 1)
            else:
                text = f"{img.where}: {text}"
            raise type(exc)(text) from None
    return out
