"""Ollama-compatible endpoints (``/api/*``): chat, generate, tags, show, ps, pull, delete,
version. Streaming answers are NDJSON (one JSON object a line), the default; with
``"stream": false`` one JSON object. Errors: ``{"error": "<message>"}``."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mmchat import __version__
from mmchat.server import schemas as S
from mmchat.server.chat import Generation, Loaded, Prepared, is_end, stream_batched
from mmchat.server.conversation import Turn, build_conversation
from mmchat.server.errors import ApiError, as_api_error, error_response
from mmchat.server.images import RawImage, decode_base64
from mmchat.server.models import parse_keep_alive
from mmchat.server.params import base_params, with_format, with_options
from mmchat.server.progress import NDJSON, Put, ndjson_line, progress_response
from mmchat.server.state import ServerState, state_of

router = APIRouter(tags=["ollama"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": S.OllamaError, "description": "bad request"},
    404: {"model": S.OllamaError, "description": "unknown model"},
    413: {"model": S.OllamaError, "description": "request or image too large"},
}


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _iso(ts: float) -> str:
    if not ts:
        ts = time.time()
    stamp = datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds")
    return stamp.replace("+00:00", "Z")


# ----------------------------------------------------------------------------- requests
ROLES = ("system", "user", "assistant")


def _messages(
    raw: Sequence[tuple[str, str, list[str]]], state: ServerState, record: Any
) -> tuple[str | None, list[Any]]:
    """(role, content, base64 images) triples → (system prompt, runtime messages)."""
    turns: list[Turn] = []
    for i, (role, content, images) in enumerate(raw, 1):
        if role not in ROLES:
            raise ApiError(
                400, f"message {i} has role {role!r}; mmchat supports system, user and assistant"
            )
        decoded = [
            RawImage(decode_base64(b, f"image {j} of message {i}"), f"image {j} of message {i}")
            for j, b in enumerate(images, 1)
        ]
        turns.append(Turn(i, role, content, decoded))
    return build_conversation(turns, state, record, allow_empty=True)


def _options(options: S.OllamaOptions | None) -> tuple[dict[str, Any], int | None]:
    if options is None:
        return {}, None
    data = options.model_dump(exclude_none=True)
    num_ctx = data.pop("num_ctx", None)
    return data, num_ctx


def _chat_prepare(req: S.OllamaChatRequest, state: ServerState) -> Callable[[], Prepared]:
    def run() -> Prepared:
        record = state.manager.resolve(req.model)
        keep = parse_keep_alive(req.keep_alive, state.manager.default_keep_alive)
        opts, num_ctx = _options(req.options)
        raw = [(m.role, m.content or "", list(m.images or [])) for m in req.messages or []]
        params = with_format(with_options(base_params(record), opts), req.format)
        if not raw:
            return Prepared(record, [], None, params, num_ctx, keep, load_only=True)
        system, messages = _messages(raw, state, record)
        return Prepared(record, messages, system or record.system, params, num_ctx, keep)

    return run


def _generate_prepare(req: S.OllamaGenerateRequest, state: ServerState) -> Callable[[], Prepared]:
    def run() -> Prepared:
        if req.raw:
            raise ApiError(400, "raw prompts are not supported: send the prompt without 'raw'")
        if req.template:
            raise ApiError(400, "per-request templates are not supported: leave 'template' out")
        if req.suffix:
            raise ApiError(400, "'suffix' (fill-in-the-middle) is not supported")
        record = state.manager.resolve(req.model)
        keep = parse_keep_alive(req.keep_alive, state.manager.default_keep_alive)
        opts, num_ctx = _options(req.options)
        params = with_format(with_options(base_params(record), opts), req.format)
        images = list(req.images or [])
        if not req.prompt and not images:
            return Prepared(record, [], None, params, num_ctx, keep, load_only=True)
        raw = [("user", req.prompt or "", images)]
        system_prompt = req.system or record.system
        if system_prompt:
            raw.insert(0, ("system", system_prompt, []))
        system, messages = _messages(raw, state, record)
        return Prepared(record, messages, system, params, num_ctx, keep)

    return run


# ----------------------------------------------------------------------------- replies
def _final_fields(gen: Generation, done: Any) -> dict[str, Any]:
    stats = done.stats.ollama(include_load=False)
    stats["load_duration"] = int(gen.load_ms * 1e6)
    stats["total_duration"] = gen.elapsed_ns()
    reason = done.done_reason if done.done_reason in ("stop", "length") else "stop"
    return {"done_reason": reason, **stats}


async def _run(
    request: Request,
    gen: Generation,
    stream: bool,
    model: str,
    piece: Callable[[str], dict[str, Any]],
    loaded: Callable[[Loaded], dict[str, Any]],
) -> Response:
    """Start ``gen``; answer with NDJSON (``stream``) or one JSON object."""
    from mmchat.runtime import Done, Token

    path = request.url.path
    gen.start()
    first = await gen.next(request)
    if is_end(first):  # the client left before anything happened
        return Response(status_code=499)
    if isinstance(first, BaseException):
        return error_response(path, first)
    if isinstance(first, Loaded):
        return JSONResponse(loaded(first))

    def head() -> dict[str, Any]:
        return {"model": model, "created_at": now_rfc3339()}

    if not stream:  # the worker sends no tokens, only the final Done (with all the text)
        item = first
        while not is_end(item):
            if isinstance(item, BaseException):
                return error_response(path, item)
            if isinstance(item, Done):
                body = {**head(), **piece(item.text), "done": True, **_final_fields(gen, item)}
                return JSONResponse(body)
            item = await gen.next(request)
        return Response(status_code=499)

    def encode(item: Any) -> list[bytes]:
        if isinstance(item, BaseException):
            return [ndjson_line({"error": as_api_error(item).message})]
        if isinstance(item, Token) and item.text:
            return [ndjson_line({**head(), **piece(item.text), "done": False})]
        if isinstance(item, Done):
            return [ndjson_line({**head(), **piece(""), "done": True, **_final_fields(gen, item)})]
        return []

    return StreamingResponse(stream_batched(gen, first, encode), media_type=NDJSON)


# ----------------------------------------------------------------------------- endpoints
@router.post(
    "/api/chat",
    response_model=S.OllamaChatChunk,
    responses={200: {"content": {NDJSON: {}}}, **ERRORS},
    summary="Chat (messages with base64 images); NDJSON stream unless stream is false",
)
async def chat(req: S.OllamaChatRequest, request: Request) -> Response:
    state = state_of(request)
    gen = Generation(state.manager, _chat_prepare(req, state), stream=req.stream)

    def loaded(item: Loaded) -> dict[str, Any]:
        return {
            "model": req.model,
            "created_at": now_rfc3339(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": "unload" if item.unloaded else "load",
            "done": True,
        }

    return await _run(
        request,
        gen,
        req.stream,
        req.model,
        lambda text: {"message": {"role": "assistant", "content": text}},
        loaded,
    )


@router.post(
    "/api/generate",
    response_model=S.OllamaGenerateChunk,
    responses={200: {"content": {NDJSON: {}}}, **ERRORS},
    summary="Complete a prompt (with base64 images); NDJSON stream unless stream is false",
)
async def generate(req: S.OllamaGenerateRequest, request: Request) -> Response:
    state = state_of(request)
    gen = Generation(state.manager, _generate_prepare(req, state), stream=req.stream)

    def loaded(item: Loaded) -> dict[str, Any]:
        return {
            "model": req.model,
            "created_at": now_rfc3339(),
            "response": "",
            "done_reason": "unload" if item.unloaded else "load",
            "done": True,
        }

    return await _run(request, gen, req.stream, req.model, lambda t: {"response": t}, loaded)


def _digest(record: Any) -> str:
    ident = json.dumps(
        {"parts": {r: p.get("digest") for r, p in record.parts.items()}, "id": record.id},
        sort_keys=True,
    )
    return hashlib.sha256(ident.encode()).hexdigest()


def _details(record: Any) -> dict[str, Any]:
    from mmchat.store.inspect import format_params

    model_info = record.parts.get("model", {}).get("info", {})
    family = record.family
    families = [family]
    if "mmproj" in record.parts:
        families.append("clip")
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": families,
        "parameter_size": format_params(model_info.get("parameters")),
        "quantization_level": record.quant,
    }


def _tag(record: Any) -> dict[str, Any]:
    return {
        "name": record.name,
        "model": record.name,
        "modified_at": _iso(record.modified),
        "size": record.size,
        "digest": _digest(record),
        "details": _details(record),
    }


@router.get("/api/tags", response_model=S.TagsResponse, summary="List the models in the store")
def tags(request: Request) -> dict[str, Any]:
    store = state_of(request).manager.store
    return {"models": [_tag(r) for r in store.list_models()]}


def _model_name(req: S.OllamaModelRequest | S.OllamaPullRequest) -> str:
    name = req.model or req.name
    if not name or not name.strip():
        raise ApiError(400, "model is required")
    return name.strip()


def _parameters_text(params: dict[str, Any]) -> str:
    lines = []
    for key, value in params.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            lines.append(f"{key:<20}{json.dumps(v) if isinstance(v, str) else v}")
    return "\n".join(lines)


@router.post(
    "/api/show",
    response_model=S.ShowResponse,
    responses={404: ERRORS[404], 400: ERRORS[400]},
    summary="Show a model: details, parameters, template, capabilities",
)
def show(req: S.OllamaModelRequest, request: Request) -> dict[str, Any]:
    record = state_of(request).manager.resolve(_model_name(req))
    model = record.parts.get("model", {}).get("info", {})
    arch = model.get("architecture") or record.family
    model_info: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": model.get("name"),
        "general.parameter_count": model.get("parameters"),
        "general.file_type": record.quant,
    }
    for key in ("context_length", "embedding_length", "block_count"):
        if model.get(key) is not None:
            model_info[f"{arch}.{key}"] = model[key]
    projector_info = None
    proj = record.parts.get("mmproj", {}).get("info")
    if proj is not None:
        projector_info = {
            "general.architecture": proj.get("architecture"),
            "clip.projector_type": proj.get("projector_type"),
            "clip.vision.image_size": proj.get("image_size"),
            "clip.vision.patch_size": proj.get("patch_size"),
            "clip.vision.tokens_per_image": proj.get("tokens_per_image"),
            "general.parameter_count": proj.get("parameters"),
            "general.file_type": proj.get("quant"),
        }
    template = record.template or ""
    modelfile = [f"# Modelfile generated by mmchat for {record.name}"]
    modelfile.append(f"FROM {record.model_path}")
    if record.mmproj_path is not None:
        modelfile.append(f"FROM {record.mmproj_path}")
    if template:
        modelfile.append(f'TEMPLATE """{template}"""')
    if record.system:
        modelfile.append(f'SYSTEM """{record.system}"""')
    for line in _parameters_text(record.params).splitlines():
        modelfile.append(f"PARAMETER {line}")
    if record.license:
        modelfile.append(f'LICENSE """{record.license}"""')
    return {
        "license": record.license or "",
        "modelfile": "\n".join(modelfile) + "\n",
        "parameters": _parameters_text(record.params),
        "template": template,
        "system": record.system,
        "details": _details(record),
        "model_info": model_info,
        "projector_info": projector_info,
        "capabilities": (
            ["embedding"] if record.is_embedding else ["completion", *record.capabilities]
        ),
        "modified_at": _iso(record.modified),
    }


@router.get("/api/ps", response_model=S.PsResponse, summary="List the loaded models")
def ps(request: Request) -> dict[str, Any]:
    out = []
    for e in state_of(request).manager.loaded():
        rec = e.record
        expires = e.expires_wall if e.expires_wall is not None else time.time() + 10 * 365 * 86400
        try:
            n_ctx = int(e.model.n_ctx)
        except Exception:  # closed meanwhile
            n_ctx = 0
        gpu = getattr(e.model.options, "n_gpu_layers", 0) not in (0, None)
        out.append(
            {
                "name": rec.name,
                "model": rec.name,
                "size": rec.size,
                "digest": _digest(rec),
                "details": _details(rec),
                "expires_at": _iso(expires),
                "size_vram": rec.size if gpu else 0,
                "context_length": n_ctx,
                "parallel": int(getattr(e.model, "n_seq", 1)),
            }
        )
    return {"models": out}


@router.delete(
    "/api/delete",
    responses={200: {"description": "deleted"}, 404: ERRORS[404], 400: ERRORS[400]},
    summary="Delete a model from the store",
)
def delete(req: S.OllamaModelRequest, request: Request) -> Response:
    state = state_of(request)
    name = _model_name(req)
    from mmchat.store import parse_name

    full = parse_name(name).full
    state.manager.store.remove(full)
    state.manager.unload(full)
    return Response(status_code=200)


@router.get("/api/version", response_model=S.VersionResponse, summary="The server's version")
def version() -> dict[str, str]:
    return {"version": __version__}


# ----------------------------------------------------------------------------- pull
class _StreamProgress:
    """A ``PullProgress`` that turns events into Ollama's pull status lines."""

    def __init__(self, put: Callable[[dict[str, Any]], None]) -> None:
        self.put = put
        self.label = ""
        self.total: int | None = None
        self.done = 0
        self._last = 0.0

    def message(self, text: str) -> None:
        self.put({"status": text})

    def start(self, label: str, total: int | None, done: int = 0) -> None:
        self.label, self.total, self.done = label, total, done
        self._emit(force=True)

    def advance(self, n: int) -> None:
        self.done += n
        self._emit()

    def finish(self, ok: bool = True) -> None:
        if ok and self.total is not None:
            self.done = self.total
        self._emit(force=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> _StreamProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        line: dict[str, Any] = {"status": f"pulling {self.label}", "completed": self.done}
        if self.total is not None:
            line["total"] = self.total
        self.put(line)


@router.post(
    "/api/pull",
    response_model=S.ProgressChunk,
    responses={200: {"content": {NDJSON: {}}}, **ERRORS},
    summary="Download a model into the store; NDJSON progress unless stream is false",
)
async def pull(req: S.OllamaPullRequest, request: Request) -> Response:
    state = state_of(request)
    name = _model_name(req)

    def work(put: Put) -> None:
        from mmchat.hub import Puller

        progress: Any = _StreamProgress(put)
        puller = Puller(state.manager.store, progress=progress)
        plan = puller.plan(name)
        put({"status": "pulling manifest"})
        for f in plan.files:
            if f.present:
                put({"status": f"{f.filename} already present", "digest": _sha(f.sha256)})
        # (a loaded older version of the model is replaced on its next use: its id differs)
        puller.pull(plan)
        put({"status": "verifying sha256 digest"})
        put({"status": "writing manifest"})
        put({"status": "success"})

    return await progress_response(
        request.url.path, stream=bool(req.stream), name="mmchat-pull", work=work
    )


def _sha(hexd: str | None) -> str | None:
    return f"sha256:{hexd}" if hexd else None
