"""A local stand-in for the Hugging Face hub, and tiny GGUF files to serve from it.

``FakeHub`` is a threaded stdlib HTTP/1.1 server speaking the URL layout huggingface_hub
2.x uses, so the real client code runs against it:

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: repo info with
  ``sha`` and ``siblings`` (``size``, ``blobId`` and ``lfs.{sha256,size}`` when
  ``?blobs=true``); unknown repo -> 404 ``X-Error-Code: RepoNotFound``;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: ``ETag``, ``X-Repo-Commit``,
  ``X-Linked-Etag``, ``X-Linked-Size``, ``Content-Length``, ``Accept-Ranges`` and HTTP
  Range (206); unknown file -> 404 ``X-Error-Code: EntryNotFound``.

Faults to inject: ``corrupt`` (flip one byte of a file), ``drop_after`` (close the
connection after N body bytes, for the next ``drop_times`` requests), ``missing`` (404 on
download although listed), ``status`` (answer a status code), ``chunk_delay`` (throttle),
``require_token``, ``ignore_range`` (answer 200 with the whole file), and
``redirect_lfs_to`` (302 LFS downloads to another server, like the hub's CDN).
Counters: ``requests`` (method, path, {lower-case header: value} for Range and
Authorization) and ``bytes_served`` (body bytes per file name).

Point huggingface_hub at it with ``Puller(endpoint=hub.url)``, with the
``patch_endpoint`` helper (it reads ``HF_ENDPOINT`` at import time), or with
``HF_ENDPOINT=hub.url`` in a subprocess's environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

CHUNK = 64 * 1024


# --------------------------------------------------------------------------- GGUF files
def write_text_gguf(
    path: Path,
    *,
    arch: str = "llama",
    n_embd: int = 64,
    n_ctx: int = 2048,
    vocab: int = 32,
    pad_bytes: int = 0,
    name: str = "tiny-text",
    file_type: int = 15,  # MOSTLY_Q4_K_M (the tensors are f32: only the header matters)
    chat_template: str | None = None,
    seed: int = 0,
) -> Path:
    """A tiny valid text-model GGUF (it parses; it is not meant to run)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_embd * 2)
    w.add_head_count(4)
    w.add_file_type(file_type)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, n_embd), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((n_embd, n_embd), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    if pad_bytes:
        n = max(1, pad_bytes // 4)
        w.add_tensor("pad.weight", rng.standard_normal(n, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_mmproj_gguf(
    path: Path,
    *,
    n_embd_text: int = 64,
    vision_width: int = 32,
    projection_dim: int | None = None,
    image_size: int = 336,
    patch_size: int = 14,
    projector_type: str = "mlp",
    audio: bool = False,
    pad_bytes: int = 0,
    seed: int = 1,
) -> Path:
    """A tiny valid LLaVA-style mmproj GGUF (``general.architecture = clip``)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name("tiny-mmproj")
    w.add_file_type(1)  # F16
    w.add_bool("clip.has_vision_encoder", not audio)
    w.add_bool("clip.has_audio_encoder", audio)
    w.add_bool("clip.has_text_encoder", False)
    w.add_string("clip.projector_type", projector_type)
    w.add_uint32("clip.vision.image_size", image_size)
    w.add_uint32("clip.vision.patch_size", patch_size)
    w.add_uint32("clip.vision.embedding_length", vision_width)
    w.add_uint32("clip.vision.feed_forward_length", vision_width * 4)
    w.add_uint32("clip.vision.block_count", 1)
    w.add_uint32("clip.vision.projection_dim", projection_dim or n_embd_text)
    w.add_uint32("clip.vision.attention.head_count", 2)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    w.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    w.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    prefix = "a" if audio else "v"
    w.add_tensor(
        f"{prefix}.patch_embd.weight", rng.standard_normal((vision_width, 3 * 4)).astype(np.float32)
    )
    w.add_tensor("mm.0.weight", rng.standard_normal((n_embd_text, vision_width), dtype=np.float32))
    w.add_tensor("mm.0.bias", np.zeros(n_embd_text, dtype=np.float32))
    w.add_tensor("mm.2.weight", rng.standard_normal((n_embd_text, n_embd_text), dtype=np.float32))
    w.add_tensor("mm.2.bias", np.zeros(n_embd_text, dtype=np.float32))
    if pad_bytes:
        w.add_tensor("pad.weight", rng.standard_normal(max(1, pad_bytes // 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --------------------------------------------------------------------------- the server
@dataclass
class FakeFile:
    data: bytes | None
    path: Path | None
    size: int
    sha256: str
    git_oid: str
    lfs: bool

    def read(self, start: int, end: int) -> bytes:
        if self.data is not None:
            return self.data[start:end]
        assert self.path is not None
        with self.path.open("rb") as fh:
            fh.seek(start)
            return fh.read(end - start)


@dataclass
class FakeRepo:
    repo_id: str
    commit: str
    files: dict[str, FakeFile]


def _file_digest(content: bytes | Path) -> tuple[int, str, str]:
    sha = hashlib.sha256()
    size = 0
    if isinstance(content, Path):
        with content.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                sha.update(chunk)
                size += len(chunk)
        git = hashlib.sha1(f"blob {size}\0".encode())
        with content.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                git.update(chunk)
    else:
        sha.update(content)
        size = len(content)
        git = hashlib.sha1(f"blob {size}\0".encode() + content)
    return size, sha.hexdigest(), git.hexdigest()


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    drop_after: dict[str, int] = field(default_factory=dict)
    drop_times: int = 1
    missing: set[str] = field(default_factory=set)
    status: dict[str, int] = field(default_factory=dict)
    chunk_delay: float = 0.0
    require_token: str | None = None
    ignore_range: bool = False
    redirect_lfs_to: str | None = None
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    bytes_served: Counter[str] = field(default_factory=Counter)
    _server: Any = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ setup
    def add_repo(
        self, repo_id: str, files: dict[str, bytes | Path], *, lfs_min_size: int = 0
    ) -> FakeRepo:
        """Serve ``files`` (name -> bytes or path); files >= lfs_min_size are LFS files."""
        entries: dict[str, FakeFile] = {}
        for name, content in files.items():
            size, sha, git = _file_digest(content)
            entries[name] = FakeFile(
                data=None if isinstance(content, Path) else content,
                path=content if isinstance(content, Path) else None,
                size=size,
                sha256=sha,
                git_oid=git,
                lfs=size >= lfs_min_size,
            )
        commit = hashlib.sha1(
            (repo_id + "".join(sorted(f.sha256 for f in entries.values()))).encode()
        ).hexdigest()
        repo = FakeRepo(repo_id, commit, entries)
        self.repos[repo_id.lower()] = repo
        return repo

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ counters
    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_served.clear()

    def downloads(self, filename: str | None = None) -> list[tuple[str, str, dict[str, str]]]:
        """GET requests to resolve/ (optionally for one file name)."""
        out = [r for r in self.requests if r[0] == "GET" and "/resolve/" in r[1]]
        if filename is not None:
            out = [r for r in out if r[1].endswith("/" + filename)]
        return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ helpers
    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _error(self, code: int, error_code: str | None, message: str) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if error_code:
            headers["X-Error-Code"] = error_code
        self._send(code, json.dumps({"error": message}).encode(), headers)

    def _log(self) -> None:
        keep = {
            k.lower(): v for k, v in self.headers.items() if k.lower() in ("range", "authorization")
        }
        with self.hub._lock:
            self.hub.requests.append((self.command, self.path, keep))

    def _authorized(self) -> bool:
        token = self.hub.require_token
        if token is None or self.headers.get("Authorization") == f"Bearer {token}":
            return True
        self._error(401, "RepoNotFound", "Repository not found")
        return False

    # ------------------------------------------------------------------ routes
    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        self._log()
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        if path.startswith("/api/models/"):
            self._api(path[len("/api/models/") :], query)
        elif "/resolve/" in path:
            self._resolve(path.lstrip("/"))
        else:
            self._error(404, None, "Not found")

    def _repo(self, repo_id: str) -> FakeRepo | None:
        return self.hub.repos.get(repo_id.lower())

    def _api(self, rest: str, query: dict[str, list[str]]) -> None:
        segs = rest.split("/")
        repo_id = "/".join(segs[:2])
        revision = "main"
        if len(segs) >= 4 and segs[2] == "revision":
            revision = "/".join(segs[3:])
        elif len(segs) != 2:
            self._error(404, None, "Not found")
            return
        if not self._authorized():
            return
        repo = self._repo(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for name, f in sorted(repo.files.items()):
            sib: dict[str, Any] = {"rfilename": name}
            if blobs:
                sib["size"] = f.size
                sib["blobId"] = f.git_oid
                if f.lfs:
                    sib["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(sib)
        info = {
            "_id": repo.commit[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": repo.commit,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": ["gguf"],
            "siblings": siblings,
            "createdAt": "2026-01-01T00:00:00.000Z",
        }
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def _resolve(self, path: str) -> None:
        head, _, rest = path.partition("/resolve/")
        revision, _, filename = rest.partition("/")
        if not self._authorized():
            return
        repo = self._repo(head)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        f = repo.files.get(filename)
        if f is None or filename in self.hub.missing:
            self._error(404, "EntryNotFound", f"{filename} does not exist on main")
            return
        if filename in self.hub.status:
            self._error(self.hub.status[filename], None, "injected failure")
            return
        etag = f.sha256 if f.lfs else f.git_oid
        if f.lfs and self.hub.redirect_lfs_to:
            # Like the real hub: LFS files live on a CDN; the redirect carries their metadata.
            target = f"{self.hub.redirect_lfs_to}/{head}/resolve/{repo.commit}/{filename}"
            self._send(
                302,
                b"",
                {
                    "Location": target,
                    "ETag": f'"{f.git_oid}"',
                    "X-Linked-Etag": f'"{f.sha256}"',
                    "X-Linked-Size": str(f.size),
                    "X-Repo-Commit": repo.commit,
                },
            )
            return
        headers = {
            "ETag": f'"{etag}"',
            "X-Repo-Commit": repo.commit,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        start, end = 0, f.size
        code = 200
        rng = None if self.hub.ignore_range else self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[len("bytes=") :].partition("-")
            start = int(a) if a else 0
            end = int(b) + 1 if b else f.size
            if start >= f.size:
                self._send(416, b"", {"Content-Range": f"bytes */{f.size}"})
                return
            code = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        self._body(filename, f, start, end)

    def _body(self, filename: str, f: FakeFile, start: int, end: int) -> None:
        hub = self.hub
        limit = None
        with hub._lock:
            if filename in hub.drop_after and hub.drop_times > 0:
                hub.drop_times -= 1
                limit = hub.drop_after[filename]
        fast = (
            limit is None
            and f.path is not None
            and filename not in hub.corrupt
            and not hub.chunk_delay
        )
        if fast:
            assert f.path is not None
            with f.path.open("rb") as fh:
                sent = self.connection.sendfile(fh, start, end - start)
            with hub._lock:
                hub.bytes_served[filename] += sent
            return
        pos = start
        sent_total = 0
        while pos < end:
            n = min(CHUNK, end - pos)
            if limit is not None:
                n = min(n, limit - sent_total)
                if n <= 0:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
            chunk = f.read(pos, pos + n)
            if filename in hub.corrupt and pos <= f.size // 2 < pos + n:
                i = f.size // 2 - pos
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
            try:
                self.wfile.write(chunk)
            except OSError:
                return
            with hub._lock:
                hub.bytes_served[filename] += len(chunk)
            pos += n
            sent_total += n
            if hub.chunk_delay:
                threading.Event().wait(hub.chunk_delay)


def patch_endpoint(monkeypatch: Any, url: str) -> None:
    """Point an already-imported huggingface_hub at ``url`` (it reads HF_ENDPOINT at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )


def env_for_subprocess(url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_ENDPOINT"] = url
    return env
