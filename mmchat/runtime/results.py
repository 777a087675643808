"""What evaluating a prompt produced: ``Evaluation`` (the parity entry points' result) and
``PromptRun`` (the counters of one prompt evaluation)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Evaluation:
    """What ``evaluate``/``evaluate_ids`` computed.

    ``image_embeddings``: one float32 ``(rows, n_embd)`` array per media item, in prompt
    order (all blocks of the item); ``logits``: float32 ``(n_vocab,)`` logits at the final
    prompt position; ``segments``: the prompt exactly as it was decoded, in order: token-id
    lists (the text and the engine's wrapper/separator tokens) and embedding arrays (one per
    block), so that ``evaluate_ids(segments)`` replays it — except M-RoPE positions, which
    only the media item carries.
    """

    image_embeddings: list[np.ndarray]
    logits: np.ndarray
    segments: list[list[int] | np.ndarray] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        """The text token ids of the prompt, wrapper tokens included (rows left out)."""
        return [t for s in self.segments if isinstance(s, list) for t in s]


@dataclass
class PromptRun:
    """Counters of one prompt evaluation."""

    prompt_tokens: int = 0
    evaluated: int = 0
    cached: int = 0
    images: int = 0
    images_encoded: int = 0
    images_from_cache: int = 0
    encode_ms: float = 0.0
    eval_ms: float = 0.0
