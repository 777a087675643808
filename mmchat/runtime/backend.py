"""What the runtime needs from a text decoder: the contract between ``LoadedModel`` and an
engine.

``mmchat.runtime._llama.Context`` (libllama) is the implementation today. The contract is
written so that a second decoder (a cross-attention decoder on ggml) and several sequences
in one context (parallel serving) fit it: every call names its sequence, positions are given
explicitly (one per token, or section-major ``n_pos_per_embd`` per embedding row for
M-RoPE models), and the KV cache is cut by position.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class TextBackend(Protocol):
    n_ctx: int
    """KV cells of the context (all sequences together)."""
    n_ctx_seq: int
    """Cells (positions) one sequence may use."""
    n_embd_image: int
    """Width of image rows it takes besides ``n_embd``-wide input embeddings (a
    cross-attention decoder's vision width), 0 for none."""
    n_batch: int
    n_ubatch: int
    n_threads: int

    @property
    def n_pos_per_embd(self) -> int:
        """Positions per embedding row: 4 for M-RoPE models (t, y, x, z), else 1."""
        ...

    def decode_tokens(
        self, tokens: np.ndarray, pos: int | np.ndarray, *, logits_last: bool, seq_id: int = 0
    ) -> None:
        """Decode token ids at positions ``pos`` (a start or one per token)."""
        ...

    def decode_embeddings(
        self,
        embd: np.ndarray,
        pos: int | np.ndarray,
        *,
        logits_last: bool,
        non_causal: bool = False,
        seq_id: int = 0,
    ) -> None:
        """Decode ``(n, n_embd)`` rows at ``pos`` (a start, or ``n * n_pos_per_embd``
        section-major positions)."""
        ...

    def decode_one(self, token: int, pos: int, seq_id: int = 0) -> None:
        """The generation step: one token, logits computed."""
        ...

    def pos_max(self, seq_id: int = 0) -> int:
        """Largest position held for the sequence, -1 when empty."""
        ...

    def truncate(self, n_keep: int, seq_id: int = 0) -> bool:
        """Drop positions >= ``n_keep`` of the sequence; False when it cannot."""
        ...

    def clear(self) -> None: ...

    def last_logits(self) -> np.ndarray: ...
