"""OpenAI-compatible endpoints (``/v1/*``): chat completions (``image_url`` parts with data
URIs; server-sent events when streaming) and the model list. Errors:
``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mmchat.server import schemas as S
from mmchat.server.chat import Generation, Loaded, Prepared, is_end, stream_batched
from mmchat.server.conversation import Turn, build_conversation
from mmchat.server.errors import ApiError, as_api_error, error_body, error_response
from mmchat.server.images import RawImage, decode_image_url, decode_input_audio
from mmchat.server.models import parse_keep_alive
from mmchat.server.params import base_params, schema_grammar
from mmchat.server.state import ServerState, state_of

router = APIRouter(tags=["openai"])
SSE = "text/event-stream"

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": S.OpenAIError, "description": "bad request"},
    404: {"model": S.OpenAIError, "description": "unknown model"},
    413: {"model": S.OpenAIError, "description": "request or image too large"},
}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _parts(msg: S.OpenAIMessage, i: int) -> tuple[str, list[RawImage]]:
    content = msg.content
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[RawImage] = []
    for j, part in enumerate(content, 1):
        if part.type == "text":
            texts.append(part.text or "")
        elif part.type == "image_url":
            url = part.image_url.url if isinstance(part.image_url, S.ImageURL) else part.image_url
            where = f"image_url of part {j} of message {i}"
            if not url:
                raise ApiError(400, f"{where} is missing")
            label = f"image {len(images) + 1} of message {i}"
            images.append(RawImage(decode_image_url(url, where), label))
        elif part.type == "input_audio":
            where = f"input_audio of part {j} of message {i}"
            audio = part.input_audio
            if audio is None:
                raise ApiError(400, f"{where} is missing")
            data = decode_input_audio(audio.data, audio.format, where)
            images.append(RawImage(data, f"audio {len(images) + 1} of message {i}", audio=True))
        else:
            raise ApiError(
                400,
                f"part {j} of message {i} has type {part.type!r}; "
                "mmchat supports 'text', 'image_url' and 'input_audio'",
            )
    return "\n".join(t for t in texts if t), images


def _sampling(req: S.ChatCompletionRequest, record: Any) -> Any:
    params = base_params(record)
    changes: dict[str, Any] = {}
    for name in ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None:
            changes[name] = value
    limit = req.max_completion_tokens or req.max_tokens
    if limit is not None:
        changes["max_tokens"] = limit
    if req.seed is not None:
        changes["seed"] = req.seed if req.seed >= 0 else None
    if req.stop is not None:
        changes["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    fmt = req.response_format
    if fmt is not None:
        if fmt.type == "json_object":
            changes.update(format="json", grammar=None)
        elif fmt.type == "json_schema":
            spec = fmt.json_schema or {}
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise ApiError(
                    400, "response_format.json_schema.schema must be a JSON schema object"
                )
            changes.update(format=None, grammar=schema_grammar(schema, field="response_format"))
        elif fmt.type != "text":
            raise ApiError(
                400,
                f"response_format.type {fmt.type!r} is not one of text, json_object, json_schema",
            )
    from mmchat.errors import UserError

    try:
        return params.updated(**changes)
    except UserError as exc:
        raise ApiError(400, str(exc)) from exc


def _prepare(req: S.ChatCompletionRequest, state: ServerState) -> Callable[[], Prepared]:
    def run() -> Prepared:

        record = state.manager.resolve(req.model)
        keep = parse_keep_alive(req.keep_alive, state.manager.default_keep_alive)
        params = _sampling(req, record)
        turns: list[Turn] = []
        for i, msg in enumerate(req.messages, 1):
            role = ROLES.get(msg.role)
            if role is None:
                raise ApiError(
                    400,
                    f"message {i} has role {msg.role!r}; mmchat supports system, developer, "
                    "user and assistant",
                )
            text, images = _parts(msg, i)
            turns.append(Turn(i, role, text, images))
        system, messages = build_conversation(turns, state, record, allow_empty=False)
        return Prepared(record, messages, system or record.system, params, None, keep)

    return run


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


@router.post(
    "/v1/chat/completions",
    response_model=S.ChatCompletion,
    responses={200: {"content": {SSE: {}}}, **ERRORS},
    summary="Chat completion (image_url parts as data URIs); server-sent events when streaming",
)
async def chat_completions(req: S.ChatCompletionRequest, request: Request) -> Response:
    from mmchat.runtime import Done, Token

    state = state_of(request)
    path = request.url.path
    gen = Generation(state.manager, _prepare(req, state), stream=bool(req.stream))
    gen.start()
    first = await gen.next(request)
    if is_end(first):
        return Response(status_code=499)
    if isinstance(first, BaseException):
        return error_response(path, first)
    assert not isinstance(first, Loaded)
    ident = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    prepared = gen.prepared
    fingerprint = f"fp_mmchat_{prepared.record.id}" if prepared is not None else "fp_mmchat"

    def usage(done: Any) -> dict[str, int]:
        p = int(done.stats.prompt_tokens)
        c = int(done.stats.generated_tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    if not req.stream:
        item = first
        while not is_end(item):
            if isinstance(item, BaseException):
                return error_response(path, item)
            if isinstance(item, Done):
                return JSONResponse(
                    {
                        "id": ident,
                        "object": "chat.completion",
                        "created": created,
                        "model": req.model,
                        "system_fingerprint": fingerprint,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": item.text},
                                "finish_reason": _finish_reason(item.done_reason),
                            }
                        ],
                        "usage": usage(item),
                    }
                )
            item = await gen.next(request)
        return Response(status_code=499)

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
        body = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return _event(body)

    def encode(item: Any) -> list[bytes]:
        if isinstance(item, BaseException):
            err = as_api_error(item)
            return [_event(error_body(path, err.status, err.message, err.code))]
        if isinstance(item, Token) and item.text:
            return [chunk({"content": item.text}, None)]
        if not isinstance(item, Done):
            return []
        out = [chunk({}, _finish_reason(item.done_reason))]
        if include_usage:
            out.append(
                _event(
                    {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": req.model,
                        "system_fingerprint": fingerprint,
                        "choices": [],
                        "usage": usage(item),
                    }
                )
            )
        out.append(b"data: [DONE]\n\n")
        return out

    return StreamingResponse(
        stream_batched(gen, first, encode, [chunk({"role": "assistant", "content": ""}, None)]),
        media_type=SSE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _model(record: Any) -> dict[str, Any]:
    return {
        "id": record.name,
        "object": "model",
        "created": int(record.modified or time.time()),
        "owned_by": "mmchat",
    }


@router.get("/v1/models", response_model=S.ModelList, summary="List the models in the store")
def models(request: Request) -> dict[str, Any]:
    store = state_of(request).manager.store
    return {"object": "list", "data": [_model(r) for r in store.list_models()]}


@router.get(
    "/v1/models/{model:path}",
    response_model=S.OpenAIModel,
    responses={404: ERRORS[404], 400: ERRORS[400]},
    summary="One model",
)
def model(model: str, request: Request) -> dict[str, Any]:
    return _model(state_of(request).manager.resolve(model))
