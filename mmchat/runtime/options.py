"""Options for loading a model and for sampling from it (plain data, no llama.cpp here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from mmchat.errors import UserError

KVCacheType = Literal["f16", "f32", "q8_0", "q4_0", "bf16"]
KV_CACHE_TYPES: tuple[str, ...] = ("f16", "f32", "q8_0", "q4_0", "bf16")

DEFAULT_N_CTX = 4096
DEFAULT_N_BATCH = 512

# Ollama's option names → SamplingParams fields (``num_predict`` -1 means "no limit").
OLLAMA_OPTION_NAMES: Mapping[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "num_predict": "max_tokens",
    "stop": "stop",
}


@dataclass
class LoadOptions:
    """How a text model (and its projector) is loaded.

    ``None`` means "decide for me":

    - ``n_ctx``: ``min(4096, the context the model was trained with)``;
    - ``n_gpu_layers``: every layer when llama.cpp was built with a GPU backend
      (``llama_supports_gpu_offload()``), else 0;
    - ``n_threads``: the CPUs this process may use (llama.cpp's own default is a fixed 4);
    - ``flash_attn``: llama.cpp's "auto".

    For exact parity with transformers set ``flash_attn=False`` and ``kv_cache_type="f32"``
    (see ``parity()``); the defaults are the fast ones.
    """

    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    n_threads: int | None = None
    n_batch: int = DEFAULT_N_BATCH
    flash_attn: bool | None = None
    kv_cache_type: KVCacheType = "f16"
    seed: int | None = None
    """Default sampling seed for sessions of this model (a session's own seed wins)."""
    verbose: bool = False
    """Let llama.cpp (and the vision engine) log to stderr."""
    vision_device: str | None = None
    """Passed to ``open_vision(device=...)``; ``None`` lets the vision engine choose."""
    n_parallel: int = 1
    """Sequences served at once (``mmchat serve --parallel``): the context holds
    ``n_parallel`` sequences of ``n_ctx`` cells each, decoded together in every step. The
    REPL and one-shot use 1."""
    scheduled: bool = False
    """Serve replies through a ``BatchScheduler`` even with one sequence (``mmchat serve``
    does): one thread owns the context and streams every reply. The REPL calls directly."""
    max_queue: int = 64
    """With ``n_parallel`` > 1: requests that may wait for a free sequence before new ones are
    refused (``QueueFullError``; the server's 503)."""

    tensor_split: tuple[float, ...] | None = None
    """How the offloaded layers are shared between the GPU-type devices (RPC workers
    first, then local GPUs), as proportions; ``None``: by free memory."""

    @classmethod
    def parity(cls, **overrides: Any) -> LoadOptions:
        """Exact arithmetic settings: flash attention off, f32 KV cache, no GPU offload."""
        base = cls(flash_attn=False, kv_cache_type="f32", n_gpu_layers=0)
        return replace(base, **overrides)

    def validate(self) -> None:
        if self.n_ctx is not None and self.n_ctx < 16:
            raise UserError(f"context size must be at least 16 tokens, got {self.n_ctx}")
        if self.n_batch < 1:
            raise UserError(f"batch size must be positive, got {self.n_batch}")
        if self.n_parallel < 1:
            raise UserError(f"parallel sequences must be at least 1, got {self.n_parallel}")
        if self.n_threads is not None and self.n_threads < 1:
            raise UserError(f"thread count must be positive, got {self.n_threads}")
        if self.tensor_split is not None and (
            not self.tensor_split
            or any(not x >= 0 for x in self.tensor_split)
            or sum(self.tensor_split) <= 0
        ):
            raise UserError(
                f"tensor split must be non-negative proportions with a positive sum, "
                f"got {list(self.tensor_split)}"
            )
        if self.kv_cache_type not in KV_CACHE_TYPES:
            raise UserError(
                f"unknown KV cache type {self.kv_cache_type!r} "
                f"(choose one of {', '.join(KV_CACHE_TYPES)})"
            )


@dataclass
class SamplingParams:
    """How tokens are chosen. Defaults follow Ollama's.

    ``temperature <= 0`` means greedy (argmax). The same ``seed`` with the same model,
    prompt and parameters gives the same output. ``seed=None`` draws a fresh seed per reply.
    ``max_tokens=None`` generates until an end-of-generation token, a stop string or a full
    context. ``format="json"`` constrains the output to a JSON object with a GBNF grammar,
    ``format={...}`` (a JSON schema, as Ollama accepts) to JSON following that schema;
    ``grammar`` takes any GBNF text (root rule ``root``) instead.
    """

    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    format: Literal["json"] | dict[str, Any] | None = None
    grammar: str | None = None

    def validate(self) -> None:
        if self.top_p <= 0 or self.top_p > 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise UserError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise UserError(f"repeat_penalty must be positive, got {self.repeat_penalty}")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise UserError(f"max_tokens must not be negative, got {self.max_tokens}")
        if self.format is not None and self.format != "json" and not isinstance(self.format, dict):
            raise UserError(f"unknown format {self.format!r} (use 'json' or a JSON schema object)")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise UserError(f"seed must be in [0, 2**32), got {self.seed}")
        if any(not s for s in self.stop):
            raise UserError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def updated(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (unknown names → UserError)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise UserError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        out = replace(self, **changes)
        if isinstance(out.stop, str):
            out.stop = [out.stop]
        out.stop = list(out.stop)
        out.validate()
        return out

    def with_ollama_options(self, options: Mapping[str, Any]) -> SamplingParams:
        """Apply an Ollama ``options`` object (unknown keys are ignored, as Ollama does)."""
        changes: dict[str, Any] = {}
        for key, value in options.items():
            name = OLLAMA_OPTION_NAMES.get(key)
            if name is None or value is None:
                continue
            if name == "max_tokens" and isinstance(value, int) and value < 0:
                value = None
            if name == "stop" and isinstance(value, str):
                value = [value]
            changes[name] = value
        return self.updated(**changes)


def as_stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    return [s for s in stop]
