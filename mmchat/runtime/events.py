"""What ``ChatSession.send`` yields: text as it streams, notices, and the final statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

DoneReason = Literal["stop", "length", "cancelled"]


@dataclass
class Stats:
    """Numbers about one reply, for ``--verbose`` (milliseconds) and the Ollama API (``ollama()``).

    ``prompt_tokens`` counts every position of the prompt (image tokens included);
    ``prompt_eval_tokens`` those evaluated for this reply; ``cached_tokens`` those reused from
    the KV cache (``prompt_tokens == prompt_eval_tokens + cached_tokens``).
    ``images_encoded`` counts the images handed to the vision engine for this reply (0 when
    every image was already in the KV cache), ``images_from_cache`` those of them it served
    from its embedding cache; ``image_encode_ms`` is the wall time of those calls.
    """

    prompt_tokens: int = 0
    prompt_eval_tokens: int = 0
    cached_tokens: int = 0
    prompt_eval_ms: float = 0.0
    generated_tokens: int = 0
    eval_ms: float = 0.0
    ttft_ms: float = 0.0
    images: int = 0
    images_encoded: int = 0
    images_from_cache: int = 0
    image_encode_ms: float = 0.0
    load_ms: float = 0.0
    queue_ms: float = 0.0
    total_ms: float = 0.0
    dropped_messages: int = 0
    done_reason: DoneReason = "stop"

    @property
    def prompt_tokens_per_s(self) -> float:
        if not self.prompt_eval_ms:
            return 0.0
        return self.prompt_eval_tokens / (self.prompt_eval_ms / 1000)

    @property
    def eval_tokens_per_s(self) -> float:
        return self.generated_tokens / (self.eval_ms / 1000) if self.eval_ms else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["prompt_tokens_per_s"] = self.prompt_tokens_per_s
        out["eval_tokens_per_s"] = self.eval_tokens_per_s
        return out

    def ollama(self, *, include_load: bool = True) -> dict[str, int]:
        """Ollama's final-chunk fields (durations in nanoseconds).

        ``prompt_eval_duration`` includes image encoding, as in Ollama; ``include_load=False``
        reports ``load_duration`` 0 (the model was already loaded for this request).
        """

        def ns(ms: float) -> int:
            return round(ms * 1e6)

        load = self.load_ms if include_load else 0.0
        return {
            "total_duration": ns(self.total_ms + load),
            "load_duration": ns(load),
            "prompt_eval_count": self.prompt_eval_tokens,
            "prompt_eval_duration": ns(self.prompt_eval_ms + self.image_encode_ms),
            "eval_count": self.generated_tokens,
            "eval_duration": ns(self.eval_ms),
        }


@dataclass
class Token:
    """A piece of the reply: whole UTF-8 characters, held back while a stop string may start."""

    text: str
    token_ids: list[int] = field(default_factory=list)


@dataclass
class ContextTrimmed:
    """The conversation no longer fit: the oldest turns were left out of the prompt.

    The system prompt is always kept. The dropped messages stay in the session's history
    (``export``) but the model no longer sees them.
    """

    dropped_messages: int
    prompt_tokens: int
    n_ctx: int

    @property
    def message(self) -> str:
        s = "" if self.dropped_messages == 1 else "s"
        return (
            f"The conversation is longer than the context ({self.n_ctx} tokens): "
            f"dropped the oldest {self.dropped_messages} message{s}."
        )


@dataclass
class Done:
    """The reply is complete (or was stopped); ``text`` is the whole reply as kept in history."""

    text: str
    stats: Stats
    done_reason: DoneReason = "stop"


Event = Token | ContextTrimmed | Done
