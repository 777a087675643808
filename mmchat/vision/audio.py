"""Loading audio clips for audio-capable projectors (Ultravox, Qwen2-Audio, Voxtral …).

``load_audio`` reads a WAV, MP3 or FLAC file (or bytes) into a ``PreparedAudio`` identified
by the sha256 of its bytes. Decoding and resampling are left to llama.cpp's mtmd (miniaudio),
which is what the projector was converted for; here the file is only checked: present,
readable, not too large (``MMCHAT_MAX_AUDIO_BYTES``), and one of the three formats by its
magic bytes. Every failure is a one-line ``UserError``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from mmchat.errors import CorruptFileError, NotFoundError, UserError
from mmchat.settings import load_settings

AUDIO_SUFFIXES = (".wav", ".mp3", ".flac")


@dataclass(frozen=True, eq=False)
class PreparedAudio:
    """An audio file's bytes, ready for an audio projector."""

    digest: str
    """sha256 (hex) of the file's bytes: the cache key."""
    data: bytes
    format: str
    """"wav", "mp3" or "flac"."""
    source: str

    kind = "audio"

    def __repr__(self) -> str:
        return (
            f"PreparedAudio(digest={self.digest[:12]}…, {self.format}, "
            f"{len(self.data)} bytes, source={self.source!r})"
        )


def sniff_audio(data: bytes) -> str | None:
    """ "wav", "mp3" or "flac" from the first bytes, None for anything else."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:3] == b"ID3":
        return "mp3"
    if len(data) >= 2 and data[0] == 0xFF and (data[1] & 0xE0) == 0xE0 and (data[1] & 0x06):
        return "mp3"  # an MPEG audio frame header (layer bits not 00)
    return None


def load_audio(source: str | Path | bytes | bytearray | memoryview) -> PreparedAudio:
    """Read and check an audio file; ``UserError`` when it is missing, empty, too large or
    not WAV/MP3/FLAC."""
    limit = load_settings().max_audio_bytes
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = f"<{len(data)} bytes>"
    else:
        path = Path(source).expanduser()
        label = str(path)
        if not path.exists():
            raise NotFoundError(f"No such audio file: {label}")
        if path.is_dir():
            raise UserError(f"{label} is a folder, not an audio file")
        try:
            size = path.stat().st_size
            if size > limit:
                raise UserError(
                    f"{label} is {size} bytes; audio files are limited to {limit} bytes "
                    "(MMCHAT_MAX_AUDIO_BYTES)"
                )
            data = path.read_bytes()
        except PermissionError:
            raise UserError(f"{label} cannot be read (permission denied)") from None
        except OSError as exc:
            raise UserError(f"{label} cannot be read: {exc.strerror or exc}") from None
    if not data:
        raise CorruptFileError(f"{label} is empty, not an audio file")
    if len(data) > limit:
        raise UserError(
            f"{label} is {len(data)} bytes; audio files are limited to {limit} bytes "
            "(MMCHAT_MAX_AUDIO_BYTES)"
        )
    fmt = sniff_audio(data)
    if fmt is None:
        raise CorruptFileError(f"{label} is not an audio file mmchat can read (WAV, MP3 or FLAC)")
    return PreparedAudio(hashlib.sha256(data).hexdigest(), data, fmt, label)
