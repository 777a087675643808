"""Downloading one hub file into the blob store: resumable, hashed while it streams.

Why not ``hf_hub_download``: it does not verify sha256 (a corrupted transfer is returned
and cached under the right name), it resumes only inside one call (not after the process
is killed), it would keep a second copy of every GGUF in the HF cache next to our blobs,
and it draws tqdm bars. So huggingface_hub provides everything around the bytes:
repository listings with LFS sha256 and sizes (``HfApi.model_info(files_metadata=True)``),
authentication headers (``build_hf_headers``: ``HF_TOKEN``, the token file in
``HF_HOME``), the file's metadata and final location (``get_hf_file_metadata``: a HEAD
through its own HTTP client, so ``HF_HUB_OFFLINE``, its error types and the hub's
redirect to the CDN apply), and the bytes are streamed here:

* into ``blobs/sha256-<hex>.partial`` (same filesystem as the blob, so the final
  ``os.replace`` is atomic), resuming with ``Range: bytes=N-`` after a dropped connection,
  a crash or Ctrl-C; the bytes already on disk are hashed once (a local read) and never
  fetched again;
* sha256 is computed while downloading (no second pass), on a second thread fed with the
  receive buffers (hashlib and file writes release the GIL, so hashing overlaps the
  transfer), and compared with the hub's LFS digest before the blob is accepted; a
  mismatch deletes the partial file and raises :class:`~mmchat.errors.CorruptFileError`;
* the blob is fsynced before it is renamed into place (the manifest is written after);
  the hashing thread starts the disk writeback of each 32 MiB already written, so that
  fsync finds little left to do (it took 0.6 s of a 2.7 s 1 GiB pull before);
* the whole transfer holds the blob's file lock, so two pulls of the same file (two
  terminals) download it once: the second waits, then finds the blob present;
* a file already in the Hugging Face cache (``HF_HOME``, e.g. from ``hf download``) is
  verified and hard-linked instead of downloaded; a corrupt cached copy is deleted there.

Why the body is read with the standard library (``urllib.request``/``http.client``) rather
than huggingface_hub's httpx client: ``readinto`` a reused 1 MiB buffer costs about a
sixth of the CPU of httpx's 64 KiB ``iter_raw`` chunks on loopback (measured: 0.05 s vs
0.30 s per 256 MiB), and with sha256 on top that is the difference between keeping up
with ``curl`` and reaching a third of its speed (benchmarks/pull.py). urllib honours the
same proxy variables (``HTTPS_PROXY``, ``NO_PROXY``); the TLS context trusts the system
store plus certifi's bundle; ``Authorization`` is sent only to the hub's own host, never
to the CDN a download is redirected to.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import queue
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mmchat.errors import CorruptFileError, NotFoundError, UserError
from mmchat.hub.progress import PullProgress
from mmchat.store.store import HASH_CHUNK, Store

REPORT_EVERY = 1 << 20
BUFFER_SIZE = 1 << 20
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


_OPENER: Any = None


def _opener() -> Any:
    """A urllib opener: env proxies, TLS with system + certifi roots, no auth leak on redirect."""
    global _OPENER
    if _OPENER is None:
        ctx = ssl.create_default_context()
        try:
            import certifi

            ctx.load_verify_locations(certifi.where())
        except (ImportError, OSError):
            pass
        _OPENER = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=ctx), _RedirectWithoutAuth()
        )
    return _OPENER


class _RedirectWithoutAuth(urllib.request.HTTPRedirectHandler):
    """Follow redirects, dropping Authorization when the host changes (CDN links are signed)."""

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlsplit(newurl).netloc != urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


class _Retryable(Exception):
    def __init__(self, message: str, *, progressed: bool = False) -> None:
        super().__init__(message)
        self.progressed = progressed


FLUSH_EVERY = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait
_sync_file_range: Any = None


def _start_writeback() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`` where libc has it (Linux).

    It only *starts* writing the dirty pages of a range to disk and returns; the final
    ``fsync`` still decides durability, but it then finds little left to write. Without
    it, the kernel holds ~all of a fast download dirty in memory and the closing ``fsync``
    of a 1 GiB blob took 0.6 s, a quarter of the pull (benchmarks/pull.py).
    """
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if sys.platform.startswith("linux"):  # nothing else has the call
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _sync_file_range = fn
            except (ImportError, OSError, AttributeError):
                pass
    fn = _sync_file_range
    if not fn:
        return None

    def start(fd: int, offset: int, n: int) -> None:
        fn(fd, offset, n, _SYNC_FILE_RANGE_WRITE)  # best effort: errors surface at fsync

    return start


class _HashPipe:
    """Hashes receive buffers on a second thread while the caller reads the next ones.

    A small pool of reusable buffers circulates: the reader fills one (``readinto``),
    writes it to the file and submits it; the hashing thread updates the digest and gives
    the buffer back. hashlib releases the GIL on large updates, so the sha256 runs in
    parallel with the socket reads and file writes, and no byte is copied in Python.

    With ``fd``/``offset`` (where the first submitted byte lies in the file) the hashing
    thread also starts the disk writeback of every :data:`FLUSH_EVERY` bytes already
    written (see :func:`_start_writeback`), so the final ``fsync`` is short.
    """

    def __init__(
        self,
        hasher: Any,
        n_buffers: int = 8,
        size: int = BUFFER_SIZE,
        *,
        fd: int | None = None,
        offset: int = 0,
    ) -> None:
        self.hasher = hasher
        self._free: queue.Queue[memoryview] = queue.Queue()
        for _ in range(n_buffers):
            self._free.put(memoryview(bytearray(size)))
        self._full: queue.Queue[tuple[memoryview, int] | None] = queue.Queue()
        self._closed = False
        self._fd = fd
        self._offset = offset
        self._writeback = _start_writeback() if fd is not None else None
        self._thread = threading.Thread(target=self._run, name="mmchat-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        update = self.hasher.update
        writeback, fd = self._writeback, self._fd
        flushed = done = self._offset
        while (item := self._full.get()) is not None:
            buf, n = item
            update(buf[:n])
            self._free.put(buf)
            done += n
            if writeback is not None and fd is not None and done - flushed >= FLUSH_EVERY:
                writeback(fd, flushed, done - flushed)
                flushed = done

    def buffer(self) -> memoryview:
        return self._free.get()

    def give_back(self, buf: memoryview) -> None:
        self._free.put(buf)

    def submit(self, buf: memoryview, n: int) -> None:
        self._full.put((buf, n))

    def close(self) -> None:
        """Wait until every submitted buffer is hashed."""
        if not self._closed:
            self._closed = True
            self._full.put(None)
            self._thread.join()


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
    def _location(self, rf: RemoteFile) -> str:
        """Where the bytes are: the hub's URL or the CDN it redirects to (one HEAD)."""
        import httpx2
        from huggingface_hub import get_hf_file_metadata
        from huggingface_hub.errors import HfHubHTTPError

        try:
            meta = get_hf_file_metadata(rf.url, headers=self.headers, timeout=self.timeout)
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in _RETRY_STATUS:
                raise _Retryable(f"HTTP {status} from the hub") from exc
            raise
        except httpx2.TransportError as exc:
            raise _Retryable(f"cannot reach the hub ({type(exc).__name__})") from exc
        return meta.location or rf.url

    def _stream(self, rf: RemoteFile, partial: Path) -> tuple[Any, int]:
        """Download ``rf`` into ``partial`` (resuming), hashing every byte once."""
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
        location: str | None = None
        self.progress.start(rf.filename, rf.size, st.offset)
        ok = False
        try:
            with partial.open("r+b" if st.offset else "wb") as fh:
                fh.seek(st.offset)
                failures = 0
                while rf.size is None or st.offset < rf.size:
                    try:
                        if location is None:
                            location = self._location(rf)
                        if self._one_request(rf, location, fh, st):
                            break
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

    def _request(self, rf: RemoteFile, location: str, offset: int) -> Any:
        """Open the GET for ``location`` from ``offset``; map HTTP errors."""
        same_host = urlsplit(location).netloc == urlsplit(rf.url).netloc
        headers = dict(self.headers) if same_host else {}
        if "user-agent" not in {k.lower() for k in headers}:
            headers["User-Agent"] = "mmchat"
        headers["Accept-Encoding"] = "identity"
        if offset:
            headers["Range"] = f"bytes={offset}-"
        req = urllib.request.Request(location, headers=headers)
        try:
            return _opener().open(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in _RETRY_STATUS:
                raise _Retryable(f"HTTP {exc.code} from the server") from exc
            if exc.code == 404:
                raise NotFoundError(
                    f"File {rf.filename!r} not found in Hugging Face repository {rf.repo}"
                ) from exc
            if exc.code in (401, 403):
                raise UserError(
                    f"Not allowed to download {rf.filename} from {rf.repo} (HTTP {exc.code}); "
                    "if the repository is private or gated, set HF_TOKEN"
                ) from exc
            raise UserError(
                f"Downloading {rf.filename} from {rf.repo} failed: HTTP {exc.code} {exc.reason}"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retryable(f"cannot connect ({reason})") from exc

    def _one_request(self, rf: RemoteFile, location: str, fh: Any, st: _State) -> bool:
        """One GET from ``st.offset`` (updated as bytes land on disk).

        True when the file is complete; :class:`_Retryable` when the transfer stopped.
        """
        start = st.offset
        with self._request(rf, location, st.offset) as resp:
            status = resp.status
            if st.offset and status == 200:
                # The server ignored Range: start over from byte 0.
                fh.seek(0)
                fh.truncate()
                st.hasher = hashlib.sha256()
                self.progress.advance(-st.offset)
                st.offset = start = 0
            elif st.offset:
                crange = resp.headers.get("Content-Range", "")
                if status != 206 or not crange.startswith(f"bytes {st.offset}-"):
                    raise _Retryable(f"unexpected answer to a range request: {status} {crange!r}")
            limit = None if rf.size is None else rf.size - start
            fh.flush()
            pipe = _HashPipe(st.hasher, fd=fh.fileno(), offset=st.offset)
            pending = 0
            try:
                while True:
                    buf = pipe.buffer()
                    try:
                        n = resp.readinto(buf)
                    except (OSError, http.client.HTTPException) as exc:
                        pipe.give_back(buf)
                        raise _Retryable(
                            f"connection problem ({type(exc).__name__})",
                            progressed=st.offset > start,
                        ) from exc
                    if not n:
                        pipe.give_back(buf)
                        break
                    try:
                        fh.write(buf[:n])
                    except OSError as exc:
                        pipe.give_back(buf)
                        raise UserError(
                            f"Cannot write {rf.filename} to {fh.name}: {exc.strerror or exc}"
                        ) from exc
                    pipe.submit(buf, n)
                    st.offset += n
                    pending += n
                    if pending >= REPORT_EVERY:
                        self.progress.advance(pending)
                        pending = 0
                    if limit is not None and st.offset - start > limit:
                        raise CorruptFileError(
                            f"{rf.filename} from {rf.repo}: the server sent more than the "
                            f"{rf.size} bytes the hub announced"
                        )
            finally:
                self.progress.advance(pending)
                pipe.close()
        if rf.size is None or st.offset >= rf.size:
            return True
        raise _Retryable("the connection closed early", progressed=st.offset > start)

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
