"""Request and response models of the HTTP API (they drive ``/openapi.json``).

Requests are lenient where the official clients send more than mmchat uses (``tools``,
``think``, ``logprobs``...: accepted and ignored) and strict on the values mmchat does use:
a wrong type or an out-of-range number is a 400 with the field named, never a 500.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INT32 = 2**31 - 1
MAX_NUM_CTX = 1 << 20


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# ----------------------------------------------------------------------------- Ollama
class OllamaOptions(_Lenient):
    """Ollama's ``options``. Unknown keys are ignored, as Ollama does."""

    temperature: float | None = Field(None, ge=0, le=1000)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT32)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0, le=1000)
    repeat_last_n: int | None = Field(None, ge=-1, le=INT32)
    presence_penalty: float | None = Field(None, ge=-1000, le=1000)
    frequency_penalty: float | None = Field(None, ge=-1000, le=1000)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    num_predict: int | None = Field(None, ge=-2, le=INT32)
    num_ctx: int | None = Field(None, ge=16, le=MAX_NUM_CTX)
    stop: str | list[str] | None = None


KeepAlive = float | str | None
OllamaFormat = Literal["", "json"] | dict[str, Any] | None


class OllamaMessage(_Lenient):
    role: Literal["system", "user", "assistant"]
    content: str | None = ""
    images: list[str] | None = Field(None, description="base64-encoded image bytes")


class OllamaChatRequest(_Lenient):
    model: str = Field(..., description="a model name from /api/tags")
    messages: list[OllamaMessage] | None = None
    stream: bool = True
    format: OllamaFormat = Field(None, description='"json" or a JSON schema')
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = Field(
        None, description='how long the model stays loaded: "5m", seconds, 0 or -1 (forever)'
    )
    tools: list[Any] | None = None
    think: bool | str | None = None


class OllamaGenerateRequest(_Lenient):
    model: str
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: list[str] | None = Field(None, description="base64-encoded image bytes")
    stream: bool = True
    format: OllamaFormat = None
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None
    think: bool | str | None = None


class OllamaModelRequest(_Lenient):
    """``/api/show``, ``/api/delete``: ``model`` (or the older ``name``)."""

    model: str | None = None
    name: str | None = None
    verbose: bool | None = None


class OllamaPullRequest(_Lenient):
    model: str | None = None
    name: str | None = None
    insecure: bool | None = None
    stream: bool = True


class ResponseMessage(BaseModel):
    role: str
    content: str
    images: list[str] | None = None


class OllamaDurations(BaseModel):
    done_reason: str | None = None
    total_duration: int | None = Field(None, description="nanoseconds")
    load_duration: int | None = Field(None, description="nanoseconds")
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = Field(None, description="nanoseconds")
    eval_count: int | None = None
    eval_duration: int | None = Field(None, description="nanoseconds")


class OllamaChatChunk(OllamaDurations):
    """One NDJSON line of ``/api/chat`` (or the whole reply with ``"stream": false``)."""

    model: str
    created_at: str
    message: ResponseMessage
    done: bool


class OllamaGenerateChunk(OllamaDurations):
    model: str
    created_at: str
    response: str
    done: bool


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str = "gguf"
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class TagModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagsResponse(BaseModel):
    models: list[TagModel]


class PsModel(BaseModel):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int
    context_length: int
    parallel: int = Field(1, description="replies this model produces at once")


class PsResponse(BaseModel):
    models: list[PsModel]


class ShowResponse(BaseModel):
    license: str
    modelfile: str
    parameters: str
    template: str
    system: str | None = None
    details: ModelDetails
    model_info: dict[str, Any]
    projector_info: dict[str, Any] | None = None
    capabilities: list[str]
    modified_at: str


class ProgressChunk(BaseModel):
    """One NDJSON line of ``/api/pull``."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class VersionResponse(BaseModel):
    version: str


class OllamaError(BaseModel):
    error: str


# ----------------------------------------------------------------------------- OpenAI
class ImageURL(_Lenient):
    url: str = Field(..., description="a data: URI (remote and file URLs are refused)")
    detail: str | None = None


class InputAudio(_Lenient):
    data: str = Field(..., description="base64-encoded audio bytes (wav, mp3 or flac)")
    format: str | None = Field(None, description='"wav", "mp3" or "flac"')


class ContentPart(_Lenient):
    type: str = Field(..., description='"text", "image_url" or "input_audio"')
    text: str | None = None
    image_url: ImageURL | str | None = None
    input_audio: InputAudio | None = None


class OpenAIMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class ResponseFormat(_Lenient):
    type: str = Field(..., description='"text", "json_object" or "json_schema"')
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Lenient):
    model: str
    messages: list[OpenAIMessage] = Field(..., min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT32, description="mmchat extension")
    max_tokens: int | None = Field(None, ge=1, le=INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    response_format: ResponseFormat | None = None
    n: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    keep_alive: KeepAlive = Field(None, description="mmchat extension, as in Ollama")


class CompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: CompletionMessage
    finish_reason: str | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


# ----------------------------------------------------------------------------- embeddings
MAX_DIMENSIONS = 1 << 16


class OllamaEmbedRequest(_Lenient):
    model: str
    input: str | list[str] | None = Field(None, description="a text or a list of texts")
    truncate: bool | None = Field(None, description="cut inputs to the context (default true)")
    dimensions: int | None = Field(None, ge=1, le=MAX_DIMENSIONS)
    keep_alive: KeepAlive = None
    options: OllamaOptions | None = None


class OllamaEmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int | None = Field(None, description="nanoseconds")
    load_duration: int | None = Field(None, description="nanoseconds")
    prompt_eval_count: int | None = None


class OllamaEmbeddingsRequest(_Lenient):
    """The older ``/api/embeddings``: one ``prompt``, an unnormalised vector."""

    model: str
    prompt: str | None = None
    keep_alive: KeepAlive = None
    options: OllamaOptions | None = None


class OllamaEmbeddingsResponse(BaseModel):
    embedding: list[float]


class EmbeddingRequest(_Lenient):
    model: str
    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a text, a list of texts, or token ids"
    )
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1, le=MAX_DIMENSIONS)
    user: str | None = None
    keep_alive: KeepAlive = Field(None, description="mmchat extension, as in Ollama")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str = Field(..., description="floats, or base64 of float32 LE")
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# ----------------------------------------------------------------------------- completions
class CompletionRequest(_Lenient):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a text or a list of texts (one choice each)"
    )
    suffix: str | None = Field(None, description="fill-in-the-middle: the text after the gap")
    max_tokens: int | None = Field(None, ge=1, le=INT32)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    echo: bool | None = None
    n: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    logprobs: int | None = Field(None, ge=0, le=5)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    keep_alive: KeepAlive = Field(None, description="mmchat extension, as in Ollama")


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


# ----------------------------------------------------------------------------- model files
class CopyRequest(_Lenient):
    source: str
    destination: str


class CreateRequest(_Lenient):
    """Ollama's current ``/api/create``: a base model (``from``) or uploaded GGUF blobs
    (``files``: file name → digest), plus template, system prompt, parameters, quantize."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)

    model: str | None = None
    name: str | None = Field(None, description="older spelling of model")
    from_: str | None = Field(None, alias="from", description="an existing model's name")
    files: dict[str, str] | None = Field(None, description="file name -> sha256:<hex> blob")
    adapters: dict[str, str] | None = None
    template: str | None = Field(None, description="a Jinja chat template")
    system: str | None = None
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    messages: list[Any] | None = None
    quantize: str | None = Field(None, description="q4_k_m, q8_0, ... (from an F16/F32 model)")
    modelfile: str | None = None
    stream: bool = True
