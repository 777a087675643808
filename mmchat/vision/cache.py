"""Image-embedding caches: an in-memory LRU with a byte budget and an optional disk cache.

Entries are keyed by (model key, image digest). The model key names the mmproj file and the
engine that produced the embeddings, so two models (or the exact and the mtmd engine on the
same file) never share entries. Stored arrays are read-only: callers get the very array that
is cached, without a copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MEMORY_BUDGET = 512 * 1024 * 1024  # bytes

_SHA256_BLOB = re.compile(r"sha256[-:]([0-9a-f]{64})$")


@dataclass(frozen=True)
class CachedEntry:
    embeddings: np.ndarray
    meta: dict[str, Any]


class EmbeddingCache:
    """Thread-safe LRU of embeddings under a byte budget (0 disables it)."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BUDGET) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], CachedEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def n_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, model_key: str, digest: str) -> CachedEntry | None:
        with self._lock:
            entry = self._items.get((model_key, digest))
            if entry is None:
                self.misses += 1
                return None
            self._items.move_to_end((model_key, digest))
            self.hits += 1
            return entry

    def put(self, model_key: str, digest: str, entry: CachedEntry) -> None:
        size = int(entry.embeddings.nbytes)
        if size > self.max_bytes:
            return
        entry.embeddings.setflags(write=False)
        with self._lock:
            old = self._items.pop((model_key, digest), None)
            if old is not None:
                self._bytes -= int(old.embeddings.nbytes)
            self._items[(model_key, digest)] = entry
            self._bytes += size
            while self._bytes > self.max_bytes and self._items:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= int(evicted.embeddings.nbytes)

    def drop_model(self, model_key: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == model_key]:
                self._bytes -= int(self._items.pop(key).embeddings.nbytes)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


_shared = EmbeddingCache()


def shared_cache() -> EmbeddingCache:
    """The process-wide cache every engine uses unless given its own."""
    return _shared


class DiskCache:
    """``<root>/<model key>/<image digest>.npz``, written atomically; damaged files are ignored."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, model_key: str, digest: str) -> Path:
        safe = re.sub(r"[^0-9A-Za-z._-]", "_", model_key)
        return self.root / safe / f"{digest}.npz"

    def get(self, model_key: str, digest: str) -> CachedEntry | None:
        path = self._path(model_key, digest)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                emb = np.ascontiguousarray(z["embeddings"], dtype=np.float32)
                meta = {k[5:]: z[k] for k in z.files if k.startswith("meta_")}
        except Exception:
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return CachedEntry(emb, {k: _unbox(v) for k, v in meta.items()})

    def put(self, model_key: str, digest: str, entry: CachedEntry) -> None:
        path = self._path(model_key, digest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    arrays = {"embeddings": entry.embeddings}
                    arrays.update({f"meta_{k}": np.asarray(v) for k, v in entry.meta.items()})
                    np.savez(fh, **arrays)  # type: ignore[arg-type]
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError:
            pass  # a cache that cannot be written is not an error


def _unbox(v: np.ndarray) -> Any:
    return v.item() if v.ndim == 0 else v


_digest_memo: dict[tuple[str, int, int], str] = {}
_digest_lock = threading.Lock()


def file_digest(path: Path) -> str:
    """sha256 of a file; free for store blobs named ``sha256-<hex>``, memoised otherwise."""
    m = _SHA256_BLOB.search(path.name)
    if m:
        return m.group(1)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _digest_lock:
        if key in _digest_memo:
            return _digest_memo[key]
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with _digest_lock:
        _digest_memo[key] = digest
    return digest
