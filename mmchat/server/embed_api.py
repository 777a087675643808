"""Embedding endpoints: Ollama's ``/api/embed`` (and the older ``/api/embeddings``) and
OpenAI's ``/v1/embeddings``.

The vectors come from llama.cpp's own embedding path (``mmchat.runtime.embedding``): a
second context over the loaded model's weights, pooled as the GGUF says (dedicated
embedding models) or mean-pooled (chat models). As in Ollama, ``/api/embed`` and
``/v1/embeddings`` return L2-normalised vectors (``dimensions`` truncates, then normalises
again) and ``/api/embeddings`` returns the raw pooled vector.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mmchat.server import schemas as S
from mmchat.server.chat import WORKERS
from mmchat.server.errors import ApiError
from mmchat.server.models import KeepAlive, parse_keep_alive
from mmchat.server.state import ServerState, state_of

router = APIRouter()
T = TypeVar("T")

OLLAMA_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": S.OllamaError, "description": "bad request"},
    404: {"model": S.OllamaError, "description": "unknown model"},
}
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": S.OpenAIError, "description": "bad request"},
    404: {"model": S.OpenAIError, "description": "unknown model"},
}

Input = str | list[int]  # a text, or token ids given directly (OpenAI)


@dataclass
class Embedded:
    vectors: list[np.ndarray]
    tokens: int
    load_ms: float


def embed_inputs(
    state: ServerState,
    model: str,
    inputs: Sequence[Input],
    *,
    keep_alive: KeepAlive,
    num_ctx: int | None = None,
    truncate: bool = True,
) -> Embedded:
    """Load ``model`` (if needed) and embed every input (blocking: run in a worker).

    No inputs: the model is only loaded (Ollama's way to warm a model up).
    """
    manager = state.manager
    record = manager.resolve(model)
    state.limits.check_count(len(inputs), state.limits.max_inputs, "inputs")
    lease = manager.acquire(record, num_ctx=num_ctx, keep_alive_s=keep_alive)
    try:
        vectors: list[np.ndarray] = []
        tokens = 0
        if inputs:
            with lease.model.lock:
                embedder = manager.embedder(lease)
                for i, item in enumerate(inputs, 1):
                    what = f"input {i}" if len(inputs) > 1 else "the input"
                    ids = embedder.tokenize(item) if isinstance(item, str) else list(item)
                    if not ids:
                        raise ApiError(400, f"{what} is empty: it has no tokens to embed")
                    ids = embedder.fit(ids, truncate=truncate, what=what)
                    vectors.append(embedder.embed_tokens(ids))
                    tokens += len(ids)
        return Embedded(vectors, tokens, lease.load_ms)
    finally:
        manager.release(lease, keep_alive)


def shaped(vec: np.ndarray, dimensions: int | None) -> list[float]:
    """Ollama's ``/api/embed`` vector: normalised; with ``dimensions``, cut and renormalised."""
    from mmchat.runtime.embedding import normalize

    out = normalize(vec)
    if dimensions is not None:
        if dimensions > out.shape[0]:
            raise ApiError(
                400,
                f"dimensions is {dimensions} but the model's embeddings have {out.shape[0]}",
            )
        if dimensions < out.shape[0]:
            out = normalize(out[:dimensions])
    return [float(x) for x in out]


async def in_worker(fn: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(WORKERS, fn)


def _options(options: S.OllamaOptions | None) -> int | None:
    return options.num_ctx if options is not None else None


@router.post(
    "/api/embed",
    response_model=S.OllamaEmbedResponse,
    responses=OLLAMA_ERRORS,
    tags=["ollama"],
    summary="Embed a text or a list of texts (L2-normalised vectors)",
)
async def embed(req: S.OllamaEmbedRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    t0 = time.perf_counter()
    keep = parse_keep_alive(req.keep_alive, state.manager.default_keep_alive)
    inputs: list[Input] = []
    if isinstance(req.input, str):
        if req.input:
            inputs.append(req.input)
    elif req.input is not None:
        inputs.extend(req.input)
    truncate = True if req.truncate is None else req.truncate

    def work() -> dict[str, Any]:
        done = embed_inputs(
            state,
            req.model,
            inputs,
            keep_alive=keep,
            num_ctx=_options(req.options),
            truncate=truncate,
        )
        return {
            "model": req.model,
            "embeddings": [shaped(v, req.dimensions) for v in done.vectors],
            "total_duration": int((time.perf_counter() - t0) * 1e9),
            "load_duration": int(done.load_ms * 1e6),
            "prompt_eval_count": done.tokens,
        }

    return JSONResponse(await in_worker(work))


@router.post(
    "/api/embeddings",
    response_model=S.OllamaEmbeddingsResponse,
    responses=OLLAMA_ERRORS,
    tags=["ollama"],
    summary="Embed one prompt (older endpoint: the vector is not normalised)",
)
async def embeddings(req: S.OllamaEmbeddingsRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    keep = parse_keep_alive(req.keep_alive, state.manager.default_keep_alive)
    inputs: list[Input] = [req.prompt] if req.prompt else []

    def work() -> dict[str, Any]:
        done = embed_inputs(
            state, req.model, inputs, keep_alive=keep, num_ctx=_options(req.options)
        )
        vec = done.vectors[0] if done.vectors else np.zeros(0, dtype=np.float32)
        if not np.all(np.isfinite(vec)):
            raise ApiError(500, "the embedding contains NaN or Inf values")
        return {"embedding": [float(x) for x in vec]}

    return JSONResponse(await in_worker(work))


def _openai_inputs(raw: str | list[str] | list[int] | list[list[int]]) -> list[Input]:
    if isinstance(raw, str):
        return [raw]
    if not raw:
        raise ApiError(400, "input must not be empty")
    out: list[Input] = []
    ids: list[int] = []
    for x in raw:
        if isinstance(x, int):
            ids.append(x)  # one input given as token ids
        elif isinstance(x, str):
            out.append(x)
        else:
            out.append([int(t) for t in x])
    return [ids] if ids else out


@router.post(
    "/v1/embeddings",
    response_model=S.EmbeddingList,
    responses=OPENAI_ERRORS,
    tags=["openai"],
    summary="Embeddings (float or base64 float32); L2-normalised",
)
async def openai_embeddings(req: S.EmbeddingRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    keep = parse_keep_alive(req.keep_alive, state.manager.default_keep_alive)
    inputs = _openai_inputs(req.input)
    as_base64 = req.encoding_format == "base64"

    def work() -> dict[str, Any]:
        done = embed_inputs(state, req.model, inputs, keep_alive=keep)
        data = []
        for i, vec in enumerate(done.vectors):
            values = shaped(vec, req.dimensions)
            item: list[float] | str = values
            if as_base64:
                item = base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "embedding": item, "index": i})
        usage = {"prompt_tokens": done.tokens, "total_tokens": done.tokens}
        return {"object": "list", "data": data, "model": req.model, "usage": usage}

    return JSONResponse(await in_worker(work))
