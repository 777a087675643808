"""The hashing thread starts disk writeback of written data early (short final fsync)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from mmchat.hub import download


def _pump(tmp_path: Path, data: bytes, *, offset: int = 0) -> tuple[str, Path]:
    path = tmp_path / "blob.partial"
    hasher = hashlib.sha256()
    with path.open("wb") as fh:
        fh.write(b"x" * offset)
        fh.flush()
        pipe = download._HashPipe(hasher, n_buffers=2, size=1000, fd=fh.fileno(), offset=offset)
        for i in range(0, len(data), 1000):
            buf = pipe.buffer()
            n = len(data[i : i + 1000])
            buf[:n] = data[i : i + n]
            fh.write(buf[:n])
            pipe.submit(buf, n)
        pipe.close()
    return hasher.hexdigest(), path


def test_writeback_ranges_cover_written_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(download, "FLUSH_EVERY", 4000)
    monkeypatch.setattr(
        download, "_start_writeback", lambda: lambda fd, off, n: calls.append((off, n))
    )
    data = os.urandom(10_500)
    digest, path = _pump(tmp_path, data, offset=123)
    assert digest == hashlib.sha256(data).hexdigest()
    assert path.stat().st_size == 123 + len(data)
    assert calls == [(123, 4000), (4123, 4000)]


def test_real_writeback_keeps_the_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "FLUSH_EVERY", 3000)
    data = os.urandom(20_000)
    digest, path = _pump(tmp_path, data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert path.read_bytes() == data
