"""Model management endpoints beyond pull/delete (Ollama's shapes): ``/api/copy``,
``HEAD``/``POST /api/blobs/sha256:<hex>`` and ``/api/create``.

- **Blobs.** An upload streams into a temporary file inside the store's blob folder while
  it is hashed; it is refused past ``Limits.max_blob_bytes`` (or the free disk space), and
  kept only if its sha256 is the digest in the URL: then it is moved into ``blobs/`` under
  the blob's lock. A wrong digest is a 400 and nothing is kept.
- **Create.** ``model`` from an existing model (``from``: its files) or from uploaded GGUF
  blobs (``files``: file name → digest; one text model, at most one projector), with a
  Jinja ``template``, ``system`` prompt, ``parameters`` and ``license``; ``quantize``
  turns a float text model into one of mmchat's types. Progress streams as NDJSON status
  lines, as Ollama does. Only names and digests are taken from the request: the server never
  reads a path named in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from mmchat.errors import UserError
from mmchat.server import schemas as S
from mmchat.server.errors import ApiError
from mmchat.server.limits import MAX_DRAIN_BYTES
from mmchat.server.progress import NDJSON, progress_response
from mmchat.server.state import ServerState, state_of

router = APIRouter(tags=["ollama"])
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": S.OllamaError, "description": "bad request"},
    404: {"model": S.OllamaError, "description": "unknown model or blob"},
}
DIGEST = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")
MAX_FILES = 8
MAX_TEXT_FIELD = 1 << 20  # template, system prompt, license: 1 MiB each
FREE_SPACE_MARGIN = 256 * 1024 * 1024
WRITE_CHUNK = 4 * 1024 * 1024  # uploads are hashed and written in pieces this big
TEMP_PREFIXES = (".upload-", ".quantize-")
STALE_AFTER_S = 24 * 3600  # a temporary file untouched this long belongs to a dead server


def _digest(raw: str) -> str:
    m = DIGEST.match(raw.strip())
    if m is None:
        raise ApiError(400, f"invalid digest {raw[:80]!r}: expected sha256:<64 hex digits>")
    return m.group(1).lower()


def sweep_stale_temporaries(store: Any, *, older_than_s: float = STALE_AFTER_S) -> list[str]:
    """Delete upload/quantize temporaries that a server killed mid-request left in the blob
    folder (untouched for ``older_than_s``: a live upload keeps writing to its file)."""
    removed: list[str] = []
    folder = Path(store.blobs_dir)
    if not folder.is_dir():
        return removed
    now = time.time()
    for path in folder.iterdir():
        if not path.name.startswith(TEMP_PREFIXES):
            continue
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime >= older_than_s:
                path.unlink()
                removed.append(path.name)
    return removed


def _sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


# ----------------------------------------------------------------------------- copy
@router.post(
    "/api/copy",
    responses={200: {"description": "copied"}, **ERRORS},
    summary="Copy a model under a new name (the files are shared)",
)
async def copy(req: S.CopyRequest, request: Request) -> Response:
    store = state_of(request).manager.store
    if not req.source.strip() or not req.destination.strip():
        raise ApiError(400, "source and destination are required")

    def work() -> None:
        store.copy(req.source.strip(), req.destination.strip())

    await asyncio.get_running_loop().run_in_executor(None, work)
    return Response(status_code=200)


# ----------------------------------------------------------------------------- blobs
@router.head(
    "/api/blobs/{digest}",
    responses={200: {"description": "present"}, 404: {"description": "absent"}},
    summary="Whether the server has a blob",
)
def blob_exists(digest: str, request: Request) -> Response:
    hexd = _digest(digest)
    present = state_of(request).manager.store.has_blob(hexd)
    return Response(status_code=200 if present else 404)


@router.post(
    "/api/blobs/{digest}",
    status_code=201,
    responses={
        200: {"description": "already present"},
        201: {"description": "stored"},
        400: ERRORS[400],
        413: {"model": S.OllamaError, "description": "too large"},
    },
    summary="Upload a file (the request body) as a blob; it must hash to the digest",
)
async def blob_upload(digest: str, request: Request) -> Response:
    state = state_of(request)
    hexd = _digest(digest)
    store = state.manager.store
    if store.has_blob(hexd):
        await _discard(request.stream())  # clients send the whole body before they read
        return Response(status_code=200)
    limit = state.limits.max_blob_bytes
    store.blobs_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(store.blobs_dir).free - FREE_SPACE_MARGIN
    too_big = ApiError(413, f"the blob is larger than the limit of {limit} bytes")
    no_room = ApiError(413, "the blob does not fit on the server's disk")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > min(limit, free):
        await _discard(request.stream())
        raise too_big if int(declared) > limit else no_room
    tmp = store.blobs_dir / f".upload-{os.getpid()}-{uuid.uuid4().hex}"
    h = hashlib.sha256()
    size = 0
    loop = asyncio.get_running_loop()
    try:
        with tmp.open("wb") as fh:

            def absorb(data: bytes) -> None:  # hashing and writing off the event loop
                h.update(data)
                fh.write(data)

            pending: list[bytes] = []
            buffered = 0
            chunks = request.stream()
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit or size > free:
                        await _discard(chunks)
                        raise too_big if size > limit else no_room
                    pending.append(chunk)
                    buffered += len(chunk)
                    if buffered >= WRITE_CHUNK:
                        await loop.run_in_executor(None, absorb, b"".join(pending))
                        pending, buffered = [], 0
            except ClientDisconnect:
                return Response(status_code=499)
            await loop.run_in_executor(None, absorb, b"".join(pending))
            await loop.run_in_executor(None, _sync, fh)
        got = h.hexdigest()
        if got != hexd:
            raise ApiError(
                400,
                f"digest mismatch: the upload ({size} bytes) has sha256:{got}, "
                f"expected sha256:{hexd}; nothing was kept",
            )

        def adopt() -> None:
            with store.holding_blob(hexd):
                if not store.has_blob(hexd):
                    os.replace(tmp, store.blob_path(hexd))

        await loop.run_in_executor(None, adopt)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return Response(status_code=201)


async def _discard(chunks: AsyncIterator[bytes]) -> None:
    """Read and drop the rest of a body we will not keep (up to ``MAX_DRAIN_BYTES``), so that
    the client, still sending, gets the answer instead of a broken connection."""
    drained = 0
    with contextlib.suppress(ClientDisconnect):
        async for chunk in chunks:
            drained += len(chunk)
            if drained > MAX_DRAIN_BYTES:
                return


# ----------------------------------------------------------------------------- create
class _Created:
    """Everything ``/api/create`` does, in a worker thread; ``put`` sends a status line."""

    def __init__(self, req: S.CreateRequest, state: ServerState, put: Callable[[Any], None]):
        self.req = req
        self.state = state
        self.store = state.manager.store
        self.put = put

    def status(self, text: str, **extra: Any) -> None:
        self.put({"status": text, **extra})

    def run(self) -> None:
        from mmchat.store import PartRef, parse_name

        req = self.req
        name = (req.model or req.name or "").strip()
        if not name:
            raise ApiError(400, "model is required (the name of the model to create)")
        mname = parse_name(name)
        self._refuse_unsupported()
        template = self._template(req.template)
        params = self._parameters(req.parameters or {})
        license_text = self._license(req.license)
        for label, text in (("system", req.system), ("template", req.template)):
            if text is not None and len(text) > MAX_TEXT_FIELD:
                raise ApiError(400, f"{label} is longer than {MAX_TEXT_FIELD} characters")
        base = None
        if req.from_:
            if req.files:
                raise ApiError(400, "give either 'from' (a model) or 'files' (blobs), not both")
            base = self.store.resolve(req.from_.strip())
            parts = {
                role: PartRef(
                    role,
                    p["digest"].split(":", 1)[-1],
                    int(p["size"]),
                    p.get("filename", ""),
                    p.get("info", {}),
                )
                for role, p in base.parts.items()
            }
            for p in parts.values():
                self.status(f"using existing layer sha256:{p.digest}")
        elif req.files:
            self.status("parsing GGUF")
            parts = self._parts_from_files(req.files)
        else:
            raise ApiError(400, "neither 'from' nor 'files' was given: nothing to create from")
        if req.quantize:
            parts["model"] = self._quantize(parts["model"], req.quantize)
        if base is not None:
            template = template if req.template is not None else base.template
            params = params if req.parameters is not None else dict(base.params)
            license_text = license_text if req.license is not None else base.license
        system = req.system if req.system is not None else (base.system if base else None)
        self.status("writing manifest")
        source: dict[str, Any] = {"type": "api"}
        if base is not None:
            source["from"] = base.name
        hint = base.template_hint if base is not None and template == base.template else None
        family = base.manifest.get("family") if base is not None else None
        self.store.commit(
            mname,
            parts,
            template=template,
            template_hint=hint,
            params=params,
            license=license_text,
            family=family,
            source=source,
            system=system or None,
        )
        self.status("success")

    def _refuse_unsupported(self) -> None:
        req = self.req
        if req.modelfile:
            raise ApiError(
                400,
                "'modelfile' is the old create API: send from/files, template, system and "
                "parameters as fields (Ollama's current /api/create)",
            )
        if req.adapters:
            raise ApiError(
                400, "LoRA adapters are not supported by mmchat: merge the adapter first"
            )
        if req.messages:
            raise ApiError(400, "stored 'messages' are not supported by mmchat")

    @staticmethod
    def _template(text: str | None) -> str | None:
        if text is None or not text.strip():
            return None
        from mmchat.runtime.template import known_format

        if known_format(text.strip()) is not None:
            return text.strip()
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:
            ImmutableSandboxedEnvironment().parse(text)
        except jinja2.TemplateSyntaxError as exc:
            raise ApiError(
                400,
                f"template line {exc.lineno}: {exc.message}; mmchat takes a Jinja chat "
                "template (as in a GGUF's tokenizer.chat_template) or a known format name, "
                "not an Ollama Go template",
            ) from None
        return text

    @staticmethod
    def _parameters(raw: dict[str, Any]) -> dict[str, Any]:
        from mmchat.store.params import parse_params

        items: list[str] = []
        for key, value in raw.items():
            values = value if isinstance(value, list) else [value]
            for v in values:
                if not isinstance(v, str | int | float | bool) or isinstance(v, bool):
                    raise ApiError(400, f"parameter {key}: {v!r} is not a number or a string")
                items.append(f"{key}={v if isinstance(v, str) else json.dumps(v)}")
        try:
            return parse_params(items)
        except UserError as exc:
            raise ApiError(400, str(exc)) from None

    @staticmethod
    def _license(raw: str | list[str] | None) -> str | None:
        if raw is None:
            return None
        text = raw if isinstance(raw, str) else "\n\n".join(raw)
        if len(text) > MAX_TEXT_FIELD:
            raise ApiError(400, f"license is longer than {MAX_TEXT_FIELD} characters")
        return text or None

    def _parts_from_files(self, files: dict[str, str]) -> dict[str, Any]:
        from mmchat.gguf_meta import read_gguf
        from mmchat.store import PartRef
        from mmchat.store.inspect import check_pair, summarize_model, summarize_projector

        if len(files) > MAX_FILES:
            raise ApiError(400, f"{len(files)} files; at most {MAX_FILES} per model")
        infos: list[tuple[str, str, Any]] = []  # (digest, file name, GGUF facts)
        for fname, digest in files.items():
            if (
                not fname
                or "/" in fname
                or "\\" in fname
                or fname in (".", "..")
                or len(fname) > 255
            ):
                raise ApiError(400, f"invalid file name {fname[:80]!r}: use a plain file name")
            hexd = _digest(digest)
            if not self.store.has_blob(hexd):
                raise ApiError(
                    400,
                    f"file {fname}: blob sha256:{hexd} is not on the server; upload it first "
                    f"(POST /api/blobs/sha256:{hexd})",
                )
            path = self.store.blob_path(hexd)
            if not fname.lower().endswith(".gguf"):
                raise ApiError(
                    400,
                    f"file {fname} is not a .gguf file: mmchat creates models from GGUF files "
                    "(convert a checkpoint with `mmchat convert`)",
                )
            try:
                info = read_gguf(path, role=f"file {fname}")
            except UserError as exc:
                raise ApiError(400, str(exc).replace(str(path), fname)) from None
            infos.append((hexd, fname, info))
        models = [x for x in infos if not x[2].is_mmproj]
        projs = [x for x in infos if x[2].is_mmproj]
        if len(models) != 1 or len(projs) > 1:
            raise ApiError(
                400,
                f"the files hold {len(models)} text models and {len(projs)} projectors; "
                "a model is one text GGUF and at most one projector (mmproj) GGUF",
            )
        d_model, f_model, i_model = models[0]
        i_proj = projs[0][2] if projs else None
        try:
            check_pair(i_model, i_proj)
        except UserError as exc:
            msg = str(exc).replace(str(i_model.path), f_model)
            if projs:
                msg = msg.replace(str(projs[0][2].path), projs[0][1])
            raise ApiError(400, msg) from None
        parts = {
            "model": PartRef("model", d_model, i_model.size, f_model, summarize_model(i_model))
        }
        self.status(f"using existing layer sha256:{d_model}")
        if projs:
            d_proj, f_proj, _ = projs[0]
            assert i_proj is not None
            parts["mmproj"] = PartRef(
                "mmproj", d_proj, i_proj.size, f_proj, summarize_projector(i_proj)
            )
            self.status(f"using existing layer sha256:{d_proj}")
        return parts

    def _quantize(self, part: Any, quant: str) -> Any:
        from mmchat.gguf_meta import read_gguf
        from mmchat.server.requantize import requantize
        from mmchat.store import PartRef
        from mmchat.store.inspect import summarize_model

        src = self.store.blob_path(part.digest)
        label = f"quantizing {str(part.info.get('quant') or 'F16').upper()} model to "
        label += quant.strip().upper()
        tmp = self.store.blobs_dir / f".quantize-{os.getpid()}-{uuid.uuid4().hex}"
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if done == total or now - last[0] >= 0.1:
                last[0] = now
                self.status(label, digest="0" * 19, total=total, completed=done)

        try:
            self.status(label, digest="0" * 19, total=part.size, completed=0)
            try:
                requantize(src, tmp, quant, progress=progress)
            except UserError as exc:
                raise ApiError(400, str(exc)) from None
            self.status("verifying conversion")
            info = read_gguf(tmp, role="quantized model")
            digest, size = self.store.ingest(tmp, move=True)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        name = re.sub(r"\.gguf$", "", part.filename or "model") + f"-{quant.lower()}.gguf"
        self.status(f"using existing layer sha256:{digest}")
        return PartRef("model", digest, size, name, summarize_model(info))


@router.post(
    "/api/create",
    response_model=S.ProgressChunk,
    responses={200: {"content": {NDJSON: {}}}, **ERRORS},
    summary="Create a model from another (from) or uploaded GGUF blobs (files); NDJSON status",
)
async def create(req: S.CreateRequest, request: Request) -> Response:
    state = state_of(request)
    return await progress_response(
        request.url.path,
        stream=bool(req.stream),
        name="mmchat-create",
        work=lambda put: _Created(req, state, put).run(),
    )
