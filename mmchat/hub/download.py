"""Downloading one hub file into the blob store: resumable, hashed while it streams.

Why not ``hf_hub_download``: it does not verify sha256 (a corrupted transfer is returned
and cached under the right name), it resumes only inside one call (not after the process
is killed), it would keep a second copy of every GGUF in the HF cache next to our blobs,
and it draws tqdm bars. So huggingface_hub provides everything except the byte stream:
repository listings with LFS sha256 and sizes (``HfApi.model_info(files_metadata=True)``),
authentication headers (``build_hf_headers``: ``HF_TOKEN``, the token file in
``HF_HOME``), its shared HTTP client (``get_session``: proxies, offline mode) and its
error types (``hf_raise_for_status``). The bytes are streamed here with that client:

* into ``blobs/sha256-<hex>.partial`` (same filesystem as the blob, so the final
  ``os.replace`` is atomic), resuming with ``Range: bytes=N-`` after a dropped connection,
  a crash or Ctrl-C; the bytes already on disk are hashed once (a local read) and never
  fetched again;
* sha256 is updated with every chunk as it is written (no second pass) and compared with
  the hub's LFS digest before the blob is accepted; a mismatch deletes the partial file
  and raises :class:`~mmchat.errors.CorruptFileError`;
* the whole transfer holds the blob's file lock, so two pulls of the same file (two
  terminals) download it once: the second waits, then finds the blob present;
* a file already in the Hugging Face cache (``HF_HOME``, e.g. from ``hf download``) is
  verified and hard-linked instead of downloaded; a corrupt cached copy is deleted there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmchat.errors import CorruptFileError, UserError
from mmchat.hub.progress import PullProgress
from mmchat.store.store import HASH_CHUNK, Store

REPORT_EVERY = 1 << 20
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class DownloadInterrupted(UserError):
    """The transfer failed after retries; the partial file is kept for the next attempt."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a hub repository at a fixed commit."""

    repo: str
    revision: str
    filename: str
    url: str
    size: int | None
    sha256: str | None
    git_oid: str | None = None


class _Retryable(Exception):
    def __init__(self, message: str, *, progressed: bool = False) -> None:
        super().__init__(message)
        self.progressed = progressed


@dataclass
class _State:
    """Where a transfer stands: bytes on disk and the hash of exactly those bytes."""

    offset: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)


def _git_blob_sha1(data: bytes) -> str:
    h = hashlib.sha1(f"blob {len(data)}\0".encode())
    h.update(data)
    return h.hexdigest()


class Downloader:
    """Streams hub files into a :class:`Store`; see the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        headers: dict[str, str] | None = None,
        session: Any = None,
        progress: PullProgress | None = None,
        retries: int = 5,
        backoff: float = 1.0,
        hf_cache: Path | None = None,
        timeout: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.headers = dict(headers or {})
        self._session = session
        self.progress = progress or PullProgress()
        self.retries = retries
        self.backoff = backoff
        self.hf_cache = hf_cache
        self.timeout = timeout
        self.sleep = sleep

    @property
    def session(self) -> Any:
        if self._session is None:
            from huggingface_hub.utils import get_session

            self._session = get_session()
        return self._session

    # ------------------------------------------------------------------ public
    def fetch(self, rf: RemoteFile) -> tuple[str, int]:
        """Make ``rf`` a verified blob; return ``(sha256 hex, size)``."""
        if rf.sha256 is None:
            return self._fetch_small(rf)
        digest = rf.sha256.lower()

        def waiting() -> None:
            self.progress.message(f"waiting for another mmchat that is downloading {rf.filename}")

        with self.store.holding_blob(digest, on_wait=waiting):
            if self.store.has_blob(digest, rf.size):
                return digest, int(rf.size or self.store.blob_path(digest).stat().st_size)
            if self._from_hf_cache(rf, digest):
                return digest, self.store.blob_path(digest).stat().st_size
            partial = self.store.partial_path(digest)
            try:
                hasher, size = self._stream(rf, partial)
            except CorruptFileError:
                partial.unlink(missing_ok=True)
                raise
            got = hasher.hexdigest()
            if got != digest:
                partial.unlink(missing_ok=True)
                raise CorruptFileError(
                    f"{rf.filename} from {rf.repo} is corrupt: sha256 {got} but the hub says "
                    f"{digest}. The bad download was deleted; run the pull again."
                )
            if rf.size is not None and size != rf.size:
                partial.unlink(missing_ok=True)
                raise CorruptFileError(
                    f"{rf.filename} from {rf.repo} has {size} bytes, expected {rf.size}; "
                    "the bad download was deleted"
                )
            os.replace(partial, self.store.blob_path(digest))
            return digest, size

    # ------------------------------------------------------------------ streaming
    def _stream(self, rf: RemoteFile, partial: Path) -> tuple[Any, int]:
        """Download ``rf.url`` into ``partial`` (resuming), hashing every byte once."""
        st = _State()
        if partial.exists():
            st.offset = partial.stat().st_size
            if rf.size is not None and st.offset > rf.size:
                partial.unlink()
                st.offset = 0
        if st.offset:
            self.progress.message(
                f"resuming {rf.filename} at byte {st.offset} of {rf.size} (checking the part "
                "already downloaded)"
            )
            with partial.open("rb") as fh:
                while chunk := fh.read(HASH_CHUNK):
                    st.hasher.update(chunk)
        self.progress.start(rf.filename, rf.size, st.offset)
        ok = False
        try:
            with partial.open("r+b" if st.offset else "wb") as fh:
                fh.seek(st.offset)
                failures = 0
                while rf.size is None or st.offset < rf.size:
                    try:
                        if self._one_request(rf, fh, st):
                            break
                        failures = 0  # the response ended early, but data came
                    except _Retryable as exc:
                        failures = 0 if exc.progressed else failures + 1
                        if failures > self.retries or (exc.progressed and self.retries == 0):
                            raise DownloadInterrupted(
                                f"Download of {rf.filename} from {rf.repo} stopped at byte "
                                f"{st.offset} of {rf.size} ({exc}); run the same command "
                                "again to resume"
                            ) from exc
                        self.progress.message(f"{exc}; resuming {rf.filename} at byte {st.offset}")
                        self.sleep(self.backoff * max(failures, 1))
                fh.flush()
                os.fsync(fh.fileno())
            ok = True
        finally:
            self.progress.finish(ok)
        return st.hasher, st.offset

    def _one_request(self, rf: RemoteFile, fh: Any, st: _State) -> bool:
        """One GET from ``st.offset`` (updated as bytes arrive); True when complete."""
        import httpx2
        from huggingface_hub.utils import hf_raise_for_status

        headers = dict(self.headers)
        headers["Accept-Encoding"] = "identity"
        if st.offset:
            headers["Range"] = f"bytes={st.offset}-"
        pending = 0
        start = st.offset
        try:
            with self.session.stream("GET", rf.url, headers=headers, timeout=self.timeout) as resp:
                if resp.status_code in _RETRY_STATUS:
                    raise _Retryable(f"HTTP {resp.status_code} from the server")
                if resp.status_code >= 400:
                    resp.read()
                    hf_raise_for_status(resp)
                if st.offset and resp.status_code == 200:
                    # The server ignored Range: start over from byte 0.
                    fh.seek(0)
                    fh.truncate()
                    st.hasher = hashlib.sha256()
                    self.progress.advance(-st.offset)
                    st.offset = start = 0
                elif st.offset:
                    crange = resp.headers.get("Content-Range", "")
                    if not crange.startswith(f"bytes {st.offset}-"):
                        raise _Retryable(f"unexpected Content-Range {crange!r}")
                write = fh.write
                update = st.hasher.update
                limit = rf.size
                for chunk in resp.iter_raw():
                    write(chunk)
                    update(chunk)
                    st.offset += len(chunk)
                    pending += len(chunk)
                    if pending >= REPORT_EVERY:
                        self.progress.advance(pending)
                        pending = 0
                    if limit is not None and st.offset > limit:
                        raise CorruptFileError(
                            f"{rf.filename} from {rf.repo}: the server sent more than the "
                            f"{limit} bytes the hub announced"
                        )
        except (httpx2.TransportError, httpx2.StreamError) as exc:
            fh.flush()
            raise _Retryable(
                f"connection problem ({type(exc).__name__})", progressed=st.offset > start
            ) from exc
        finally:
            self.progress.advance(pending)
        if rf.size is None or st.offset >= rf.size:
            return True
        if st.offset == start:
            raise _Retryable("the server sent no data")
        return False

    # ------------------------------------------------------------------ small files
    def _fetch_small(self, rf: RemoteFile) -> tuple[str, int]:
        """Non-LFS files (small by hub rules): whole download, git blob id checked."""
        from huggingface_hub.utils import hf_raise_for_status

        resp = self.session.get(rf.url, headers=self.headers, timeout=self.timeout)
        hf_raise_for_status(resp)
        data = resp.content
        if rf.git_oid and _git_blob_sha1(data) != rf.git_oid:
            raise CorruptFileError(f"{rf.filename} from {rf.repo} is corrupt (git blob id)")
        digest = hashlib.sha256(data).hexdigest()
        with self.store.holding_blob(digest):
            if not self.store.has_blob(digest):
                tmp = self.store.partial_path(digest)
                tmp.write_bytes(data)
                os.replace(tmp, self.store.blob_path(digest))
        return digest, len(data)

    # ------------------------------------------------------------------ HF cache
    def _hf_cache_blob(self, rf: RemoteFile, digest: str) -> Path | None:
        if self.hf_cache is None:
            return None
        folder = self.hf_cache / ("models--" + rf.repo.replace("/", "--"))
        path = folder / "blobs" / digest
        return path if path.is_file() else None

    def _from_hf_cache(self, rf: RemoteFile, digest: str) -> bool:
        """Adopt a verified copy from the Hugging Face cache (caller holds the blob lock)."""
        cached = self._hf_cache_blob(rf, digest)
        if cached is None:
            return False
        self.progress.message(f"verifying {rf.filename} found in the Hugging Face cache")
        hasher = hashlib.sha256()
        size = 0
        self.progress.start(f"{rf.filename} (HF cache)", cached.stat().st_size, 0)
        with cached.open("rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
                self.progress.advance(len(chunk))
        good = hasher.hexdigest() == digest and (rf.size is None or size == rf.size)
        self.progress.finish(good)
        if not good:
            self._purge_hf_cache(cached)
            self.progress.message(
                f"the Hugging Face cache copy of {rf.filename} was corrupt and has been "
                "deleted; downloading it again"
            )
            return False
        self.store.adopt(cached, digest)
        return True

    @staticmethod
    def _purge_hf_cache(blob: Path) -> None:
        """Delete a bad blob from the HF cache and the snapshot links that point at it."""
        snapshots = blob.parent.parent / "snapshots"
        target = blob.resolve()
        if snapshots.is_dir():
            for link in snapshots.rglob("*"):
                if link.is_symlink():
                    with contextlib.suppress(OSError):
                        if link.resolve() == target:
                            link.unlink()
        blob.unlink(missing_ok=True)
