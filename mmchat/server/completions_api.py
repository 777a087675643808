"""OpenAI's legacy text completions, ``POST /v1/completions``.

As in Ollama, a prompt is sent to the model as a user message through its chat template
(what ``/api/generate`` does without ``raw``); a list of prompts gives one choice per
prompt, generated one after the other. With ``suffix`` the prompt is the text before a gap
and the model fills it in with its vocabulary's fill-in-the-middle tokens (no chat
template, as llama-server's infill); a model without FIM tokens gets a 400. ``echo``,
``logprobs`` and token-id prompts are refused with a 400 that says so. Streaming is
server-sent events like
``/v1/chat/completions``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mmchat.errors import UserError
from mmchat.server import schemas as S
from mmchat.server.chat import Generation, Prepared, is_end, stream_batched
from mmchat.server.errors import ApiError, as_api_error, error_body, error_response
from mmchat.server.models import parse_keep_alive
from mmchat.server.params import base_params
from mmchat.server.state import ServerState, state_of

router = APIRouter(tags=["openai"])
SSE = "text/event-stream"
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": S.OpenAIError, "description": "bad request"},
    404: {"model": S.OpenAIError, "description": "unknown model"},
}


def _prompts(req: S.CompletionRequest, state: ServerState) -> list[str]:
    if req.echo:
        raise ApiError(
            400, "echo is not supported: mmchat returns the completion without the prompt"
        )
    if req.logprobs:
        raise ApiError(400, "logprobs are not supported by mmchat")
    raw = req.prompt
    if isinstance(raw, str):
        prompts = [raw]
    elif not raw:
        raise ApiError(400, "prompt must not be empty")
    elif all(isinstance(p, str) for p in raw):
        prompts = [str(p) for p in raw]
    else:
        raise ApiError(400, "token-id prompts are not supported: send the prompt as text")
    state.limits.check_count(len(prompts), state.limits.max_prompts, "prompts")
    return prompts


def _sampling(req: S.CompletionRequest, record: Any) -> Any:
    params = base_params(record)
    changes: dict[str, Any] = {}
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None:
            changes[name] = value
    if req.max_tokens is not None:
        changes["max_tokens"] = req.max_tokens
    if req.seed is not None:
        changes["seed"] = req.seed if req.seed >= 0 else None
    if req.stop is not None:
        changes["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    try:
        return params.updated(**changes)
    except UserError as exc:
        raise ApiError(400, str(exc)) from exc


def _prepare(req: S.CompletionRequest, state: ServerState, prompt: str) -> Callable[[], Prepared]:
    def run() -> Prepared:
        from mmchat.runtime import Message

        record = state.manager.resolve(req.model)
        keep = parse_keep_alive(req.keep_alive, state.manager.default_keep_alive)
        params = _sampling(req, record)
        system = getattr(record, "system", None)
        infill = (prompt, req.suffix) if req.suffix else None
        return Prepared(
            record, [Message("user", prompt)], system, params, None, keep, infill=infill
        )

    return run


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


@router.post(
    "/v1/completions",
    response_model=S.Completion,
    responses={200: {"content": {SSE: {}}}, **ERRORS},
    summary="Text completion of a prompt (or a list: one choice each); SSE when streaming",
)
async def completions(req: S.CompletionRequest, request: Request) -> Response:
    from mmchat.runtime import Done, Token

    state = state_of(request)
    path = request.url.path
    prompts = _prompts(req, state)
    stream = bool(req.stream)
    ident = f"cmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    def count(done: Any) -> None:
        p, c = int(done.stats.prompt_tokens), int(done.stats.generated_tokens)
        usage["prompt_tokens"] += p
        usage["completion_tokens"] += c
        usage["total_tokens"] += p + c

    def start(i: int) -> Generation:
        gen = Generation(state.manager, _prepare(req, state, prompts[i]), stream=stream)
        gen.start()
        return gen

    gen = start(0)
    first = await gen.next(request)
    if is_end(first):
        return Response(status_code=499)
    if isinstance(first, BaseException):
        return error_response(path, first)
    prepared = gen.prepared
    fingerprint = f"fp_mmchat_{prepared.record.id}" if prepared is not None else "fp_mmchat"

    def body(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "system_fingerprint": fingerprint,
            "choices": choices,
            **extra,
        }

    def choice(i: int, text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": i, "logprobs": None, "finish_reason": finish}

    if not stream:
        choices: list[dict[str, Any]] = []
        for i in range(len(prompts)):
            if i:
                gen = start(i)
                first = await gen.next(request)
            item = first
            while not isinstance(item, Done):
                if is_end(item):
                    return Response(status_code=499)
                if isinstance(item, BaseException):
                    return error_response(path, item)
                item = await gen.next(request)
            count(item)
            choices.append(choice(i, item.text, _finish(item.done_reason)))
        return JSONResponse(body(choices, usage=usage))

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    failed = False

    async def events() -> AsyncIterator[bytes]:
        nonlocal failed, gen, first
        for i in range(len(prompts)):
            if i:
                gen = start(i)
                first = await gen.next()

            def encode(item: Any, i: int = i) -> list[bytes]:
                nonlocal failed
                if isinstance(item, BaseException):
                    failed = True
                    err = as_api_error(item)
                    return [_event(error_body(path, err.status, err.message, err.code))]
                if isinstance(item, Token) and item.text:
                    return [_event(body([choice(i, item.text, None)]))]
                if isinstance(item, Done):
                    count(item)
                    return [_event(body([choice(i, "", _finish(item.done_reason))]))]
                return []

            async for chunk in stream_batched(gen, first, encode):
                yield chunk
            if failed:
                return
        if include_usage:
            yield _event(body([], usage=usage))
        yield b"data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type=SSE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
