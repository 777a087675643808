"""The local model store: content-addressed blobs plus one JSON manifest per NAME:TAG.

Layout under ``MMCHAT_HOME/models`` (like Ollama's ``~/.ollama/models``)::

    blobs/sha256-<hex>              one file per distinct content (GGUF parts)
    blobs/sha256-<hex>.partial      a download in progress (resumable)
    manifests/<model>/<tag>.json    e.g. manifests/llava/13b.json
    manifests/hf.co/<org>/<repo>/<tag>.json
    locks/store.lock                held around every manifest/blob mutation
    locks/sha256-<hex>.lock         held while one blob is being downloaded/ingested

Invariants:

* a blob's name is the sha256 of its bytes: blobs are written to a temporary name,
  verified, then ``os.replace``-d into place;
* a manifest is written (atomically, temp + ``os.replace``) only after every blob it
  names exists, under the store lock; a crash between the two leaves an orphan blob,
  never a dangling manifest;
* ``rm`` deletes a blob only when no remaining manifest references it.

Manifest (schema 1)::

    {
      "schema": 1,
      "name": "llava:13b",
      "family": "llava",
      "created_at": "2026-11-21T21:05:11Z",
      "parts": {
        "model":  {"digest": "sha256:<hex>", "size": 7865956224,
                   "filename": "ggml-model-q4_k.gguf", "info": {...summarize_model...}},
        "mmproj": {"digest": "sha256:<hex>", "size": 645, "filename": "...",
                   "info": {...summarize_projector...}}
      },
      "template": null | "<jinja chat template text>",
      "template_hint": null | "vicuna" | "mistral-instruct" | ...,
      "params": {"num_ctx": 4096},
      "license": null | "apache-2.0",
      "system": "<default system prompt>" (optional; set by the API's create),
      "source": {"type": "hf", "repo": "mys/ggml_llava-v1.5-13b", "revision": "<commit>",
                 "files": {"model": "ggml-model-q4_k.gguf", "mmproj": "mmproj-model-f16.gguf"}}
                | {"type": "local", "files": {...}} | {"type": "convert", ...}
    }
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from mmchat.errors import CorruptFileError, NotFoundError, UserError
from mmchat.store.names import ModelName, parse_name

SCHEMA = 1
HASH_CHUNK = 8 * 1024 * 1024
_HEX = re.compile(r"^[0-9a-f]{64}$")
BLOB_NAME = re.compile(r"^sha256-([0-9a-f]{64})$")
PART_ROLES = ("model", "mmproj")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_digest(digest: str) -> str:
    """Accept ``<hex>``, ``sha256:<hex>`` or ``sha256-<hex>``; return the bare hex."""
    hexd = digest.split(":", 1)[1] if digest.startswith("sha256:") else digest
    hexd = hexd.removeprefix("sha256-").lower()
    if not _HEX.match(hexd):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hexd


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def hash_file(path: Path, *, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """sha256 hex and size of a file, in one read pass."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest(), size


@dataclass(frozen=True)
class PartRef:
    """One GGUF part of a model, as stored in its manifest."""

    role: str
    digest: str  # bare hex
    size: int
    filename: str
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": f"sha256:{self.digest}",
            "size": self.size,
            "filename": self.filename,
            "info": self.info,
        }


@dataclass
class ModelRecord:
    """A model in the store, resolved to file paths (the contract used by run/serve/convert)."""

    name: str
    model_path: Path
    mmproj_path: Path | None
    template: str | None
    params: dict[str, Any]
    manifest: dict[str, Any]
    manifest_path: Path | None = None

    @property
    def id(self) -> str:
        """12 hex digits identifying the content (same for a model and its `cp` copies)."""
        ident = {
            "parts": {r: p.get("digest") for r, p in self.manifest.get("parts", {}).items()},
            "template": self.template,
            "template_hint": self.template_hint,
            "params": self.params,
        }
        data = json.dumps(ident, sort_keys=True).encode()
        return hashlib.sha256(data).hexdigest()[:12]

    @property
    def parts(self) -> dict[str, dict[str, Any]]:
        return dict(self.manifest.get("parts", {}))

    @property
    def size(self) -> int:
        return sum(int(p.get("size", 0)) for p in self.parts.values())

    @property
    def family(self) -> str:
        fam = self.manifest.get("family")
        if fam:
            return str(fam)
        return str(self.parts.get("model", {}).get("info", {}).get("architecture") or "-")

    @property
    def quant(self) -> str:
        return str(self.parts.get("model", {}).get("info", {}).get("quant") or "-")

    @property
    def template_hint(self) -> str | None:
        hint = self.manifest.get("template_hint")
        return str(hint) if hint else None

    @property
    def license(self) -> str | None:
        lic = self.manifest.get("license")
        return str(lic) if lic else None

    @property
    def system(self) -> str | None:
        """The default system prompt (``create``'s ``system``), used when a request has none."""
        text = self.manifest.get("system")
        return str(text) if text else None

    @property
    def capabilities(self) -> list[str]:
        """``["vision"]``, ``["audio"]``, both, or ``[]`` for a text-only model."""
        info = self.parts.get("mmproj", {}).get("info", {})
        caps = []
        if "mmproj" in self.parts and info.get("vision", True):
            caps.append("vision")
        if info.get("audio"):
            caps.append("audio")
        return caps

    @property
    def is_embedding(self) -> bool:
        """A dedicated embedding model (its GGUF names a pooling): it embeds, it does not chat."""
        pooling = self.parts.get("model", {}).get("info", {}).get("pooling")
        return isinstance(pooling, int) and not isinstance(pooling, bool) and pooling != 0

    @property
    def modified(self) -> float:
        if self.manifest_path is not None:
            with contextlib.suppress(OSError):
                return self.manifest_path.stat().st_mtime
        return 0.0


class Store:
    """A model store rooted at ``home/models``. Cheap to create; holds no open files."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.root = self.home / "models"
        self.blobs_dir = self.root / "blobs"
        self.manifests_dir = self.root / "manifests"
        self.locks_dir = self.root / "locks"

    # ---------------------------------------------------------------- locks and paths
    def _ensure_dirs(self) -> None:
        for d in (self.blobs_dir, self.manifests_dir, self.locks_dir):
            d.mkdir(parents=True, exist_ok=True)

    def lock(self) -> FileLock:
        """The store-wide lock around manifest writes and blob deletions (short sections)."""
        self._ensure_dirs()
        return FileLock(str(self.locks_dir / "store.lock"))

    def blob_lock(self, digest: str) -> FileLock:
        """Held while one blob is downloaded or ingested (may be long)."""
        self._ensure_dirs()
        return FileLock(str(self.locks_dir / f"sha256-{check_digest(digest)}.lock"))

    @contextlib.contextmanager
    def holding_blob(
        self, digest: str, on_wait: Callable[[], None] | None = None
    ) -> Iterator[None]:
        """Hold the blob's lock; call ``on_wait`` once if another process holds it."""
        lock = self.blob_lock(digest)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait()
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / f"sha256-{check_digest(digest)}"

    def partial_path(self, digest: str) -> Path:
        return self.blobs_dir / f"sha256-{check_digest(digest)}.partial"

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def manifest_path(self, name: ModelName) -> Path:
        path = self.manifests_dir.joinpath(*name.path_parts)
        # parse_name already forbids anything that could escape; check once more anyway.
        root = self.manifests_dir.resolve()
        if root not in path.resolve().parents:
            raise UserError(f"Invalid model name {name.full!r}")
        return path

    # ---------------------------------------------------------------- blobs
    def ingest(
        self,
        path: Path,
        *,
        move: bool = False,
        link: bool = True,
        expected_digest: str | None = None,
    ) -> tuple[str, int]:
        """Put a local file into the blob store; return ``(hex digest, size)``.

        ``move``: the file is consumed (renamed into the store when on the same
        filesystem). Otherwise it is hard-linked when ``link`` and possible, else copied
        (hashing while copying: one pass).
        """
        src = Path(path)
        if not src.is_file():
            raise NotFoundError(f"No such file: {src}")
        self._ensure_dirs()
        if not (move or link):
            tmp, digest, size = self._copy_to_tmp(src)
            try:
                self._expect(src, digest, expected_digest)
                with self.holding_blob(digest):
                    if not self.blob_path(digest).exists():
                        os.replace(tmp, self.blob_path(digest))
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            return digest, size
        digest, size = hash_file(src)
        self._expect(src, digest, expected_digest)
        with self.holding_blob(digest):
            dst = self.blob_path(digest)
            if not dst.exists() and not self._rename_or_link(src, dst, move=move):
                tmp, got, _ = self._copy_to_tmp(src)
                if got != digest:
                    tmp.unlink()
                    raise CorruptFileError(f"{src} changed while it was being imported")
                os.replace(tmp, dst)
            if move:
                with contextlib.suppress(FileNotFoundError):
                    src.unlink()
        return digest, size

    def adopt(self, src: Path, digest: str) -> None:
        """Hard-link (else copy) ``src``, already verified to hash to ``digest``, into blobs.

        The caller holds the blob's lock (:meth:`holding_blob`).
        """
        hexd = check_digest(digest)
        dst = self.blob_path(hexd)
        if dst.exists() or self._rename_or_link(src, dst, move=False):
            return
        tmp, got, _ = self._copy_to_tmp(src)
        if got != hexd:
            tmp.unlink()
            raise CorruptFileError(f"{src} changed while it was being copied into the store")
        os.replace(tmp, dst)

    def _rename_or_link(self, src: Path, dst: Path, *, move: bool) -> bool:
        """Rename (move) or hard-link ``src`` to ``dst``; False when not possible here."""
        if move:
            try:
                os.replace(src, dst)
                return True
            except OSError:
                return False  # another filesystem
        tmp = self._tmp_blob()
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
            return True
        except OSError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _copy_to_tmp(self, src: Path) -> tuple[Path, str, int]:
        """Copy ``src`` to a temporary blob, hashing while copying (one pass)."""
        tmp = self._tmp_blob()
        h = hashlib.sha256()
        size = 0
        try:
            with src.open("rb") as fin, tmp.open("wb") as fout:
                while chunk := fin.read(HASH_CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
                    size += len(chunk)
                fout.flush()
                os.fsync(fout.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return tmp, h.hexdigest(), size

    def _tmp_blob(self) -> Path:
        return self.blobs_dir / f".tmp-{os.getpid()}-{uuid.uuid4().hex}"

    @staticmethod
    def _expect(src: Path, digest: str, expected: str | None) -> None:
        if expected is not None and check_digest(expected) != digest:
            raise CorruptFileError(
                f"{src} has sha256 {digest}, expected {check_digest(expected)}: "
                "the file is corrupt or not the one named"
            )

    # ---------------------------------------------------------------- manifests
    def commit(
        self,
        name: str | ModelName,
        parts: dict[str, PartRef],
        *,
        template: str | None = None,
        template_hint: str | None = None,
        params: dict[str, Any] | None = None,
        license: str | None = None,
        family: str | None = None,
        source: dict[str, Any] | None = None,
        system: str | None = None,
    ) -> ModelRecord:
        """Write the manifest for ``name`` once every blob it references is present."""
        mname = parse_name(name) if isinstance(name, str) else name
        if "model" not in parts:
            raise ValueError("a model needs a 'model' part")
        manifest: dict[str, Any] = {
            "schema": SCHEMA,
            "name": mname.full,
            "family": family,
            "created_at": now_iso(),
            "parts": {role: parts[role].to_json() for role in PART_ROLES if role in parts},
            "template": template,
            "template_hint": template_hint,
            "params": dict(params or {}),
            "license": license,
            "source": dict(source or {}),
        }
        if system:
            manifest["system"] = system
        path = self.manifest_path(mname)
        with self.lock():
            for part in parts.values():
                if not self.has_blob(part.digest, part.size):
                    raise CorruptFileError(
                        f"Blob sha256:{part.digest} for {part.filename} vanished before "
                        f"{mname.full} could be registered; run the command again"
                    )
            self._write_manifest(path, manifest)
        return self._record(manifest, path)

    def _write_manifest(self, path: Path, manifest: dict[str, Any]) -> None:
        data = json.dumps(manifest, indent=2, sort_keys=False).encode() + b"\n"
        write_atomic(path, data)

    def register(
        self,
        name: str,
        *,
        model: Path,
        mmproj: Path | None = None,
        template: str | None = None,
        params: dict[str, Any] | None = None,
        source: dict[str, Any] | None = None,
        license: str | None = None,
        move: bool = False,
        link: bool = True,
        template_hint: str | None = None,
        family: str | None = None,
    ) -> ModelRecord:
        """Validate, hash and store local GGUF files under ``name`` (used by convert/create).

        ``move=True`` consumes the files; otherwise they are hard-linked (``link``) or
        copied into the blob store. A blob shared by two names is stored once.
        """
        from mmchat.store.inspect import read_pair, summarize_model, summarize_projector

        mname = parse_name(name)
        model_info, mmproj_info = read_pair(model, mmproj)
        parts: dict[str, PartRef] = {}
        files = {"model": Path(model)} | ({"mmproj": Path(mmproj)} if mmproj else {})
        summaries = {"model": summarize_model(model_info)}
        if mmproj_info is not None:
            summaries["mmproj"] = summarize_projector(mmproj_info)
        for role, path in files.items():
            digest, size = self.ingest(path, move=move, link=link)
            parts[role] = PartRef(role, digest, size, path.name, summaries[role])
        src = dict(source or {"type": "local"})
        src.setdefault("files", {role: str(p) for role, p in files.items()})
        return self.commit(
            mname,
            parts,
            template=template,
            template_hint=template_hint,
            params=params,
            license=license,
            family=family,
            source=src,
        )

    def _load_manifest(self, path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFileError(f"Manifest {path} is unreadable: {exc}") from exc
        if not isinstance(data, dict) or "model" not in data.get("parts", {}):
            raise CorruptFileError(f"Manifest {path} has no model part")
        return data

    def _record(self, manifest: dict[str, Any], path: Path | None) -> ModelRecord:
        parts = manifest["parts"]
        model_path = self.blob_path(parts["model"]["digest"])
        mmproj = parts.get("mmproj")
        return ModelRecord(
            name=str(manifest.get("name")),
            model_path=model_path,
            mmproj_path=self.blob_path(mmproj["digest"]) if mmproj else None,
            template=manifest.get("template"),
            params=dict(manifest.get("params") or {}),
            manifest=manifest,
            manifest_path=path,
        )

    def get(self, name: str | ModelName) -> ModelRecord | None:
        """The record for ``name``, or None when it is not in the store (no blob check)."""
        mname = parse_name(name) if isinstance(name, str) else name
        path = self.manifest_path(mname)
        if not path.is_file():
            return None
        return self._record(self._load_manifest(path), path)

    def resolve(self, name: str | ModelName) -> ModelRecord:
        """The record for ``name`` with its files checked; NotFoundError when absent."""
        mname = parse_name(name) if isinstance(name, str) else name
        rec = self.get(mname)
        if rec is None:
            raise NotFoundError(
                f"Model {mname.full!r} is not in the store; pull it with `mmchat pull {mname.full}`"
            )
        for role, part in rec.parts.items():
            if not self.has_blob(part["digest"], part.get("size")):
                raise CorruptFileError(
                    f"The {role} file of {mname.full} (sha256:{check_digest(part['digest'])[:12]}) "
                    f"is missing or damaged; run `mmchat pull {mname.full}` again or "
                    f"`mmchat rm {mname.full}`"
                )
        return rec

    def exists(self, name: str | ModelName) -> bool:
        return self.get(name) is not None

    def list_models(
        self, on_error: Callable[[Path, Exception], None] | None = None
    ) -> list[ModelRecord]:
        """Every model in the store, sorted by name. Unreadable manifests go to on_error."""
        records: list[ModelRecord] = []
        if not self.manifests_dir.is_dir():
            return records
        for path in sorted(self.manifests_dir.rglob("*.json")):
            if path.name.startswith("."):
                continue
            try:
                records.append(self._record(self._load_manifest(path), path))
            except (UserError, KeyError, TypeError, ValueError) as exc:
                if on_error is not None:
                    on_error(path, exc)
        return sorted(records, key=lambda r: r.name)

    def referenced_digests(self) -> set[str]:
        refs: set[str] = set()
        for rec in self.list_models():
            for part in rec.parts.values():
                with contextlib.suppress(ValueError, KeyError):
                    refs.add(check_digest(part["digest"]))
        return refs

    # ---------------------------------------------------------------- rm / cp
    def remove(self, name: str | ModelName) -> tuple[str, int, int]:
        """Remove ``name``; delete its blobs no other manifest uses.

        Returns ``(full name, blobs deleted, bytes freed)``.
        """
        mname = parse_name(name) if isinstance(name, str) else name
        path = self.manifest_path(mname)
        with self.lock():
            if not path.is_file():
                raise NotFoundError(f"Model {mname.full!r} is not in the store")
            try:
                digests = {
                    check_digest(p["digest"]) for p in self._load_manifest(path)["parts"].values()
                }
            except CorruptFileError:
                digests = set()
            path.unlink()
            self._prune_dirs(path.parent)
            still = self.referenced_digests()
            deleted = freed = 0
            for digest in sorted(digests - still):
                blob = self.blob_path(digest)
                with contextlib.suppress(FileNotFoundError):
                    freed += blob.stat().st_size
                    blob.unlink()
                    deleted += 1
        return mname.full, deleted, freed

    def _prune_dirs(self, folder: Path) -> None:
        while folder != self.manifests_dir and self.manifests_dir in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def copy(self, src: str | ModelName, dst: str | ModelName) -> ModelRecord:
        """Make ``dst`` name the same blobs as ``src`` (no data is copied)."""
        rec = self.resolve(src)
        dname = parse_name(dst) if isinstance(dst, str) else dst
        manifest = json.loads(json.dumps(rec.manifest))
        manifest["name"] = dname.full
        manifest["created_at"] = now_iso()
        manifest.setdefault("source", {})["copied_from"] = rec.name
        path = self.manifest_path(dname)
        with self.lock():
            for part in manifest["parts"].values():
                if not self.has_blob(part["digest"]):
                    raise CorruptFileError(f"{rec.name} lost a file while being copied")
            self._write_manifest(path, manifest)
        return self._record(manifest, path)

    def delete_orphans(self, digests: set[str]) -> None:
        """Delete these blobs if no manifest references them (cleanup after a failed pull)."""
        with self.lock():
            still = self.referenced_digests()
            for digest in digests - still:
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(digest).unlink()


def open_store(home: Path | None = None) -> Store:
    """The store under ``home`` (``MMCHAT_HOME`` by default)."""
    if home is None:
        from mmchat.settings import load_settings

        home = load_settings().home
    return Store(Path(home).expanduser())
