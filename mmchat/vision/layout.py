"""How one image or audio clip is laid out in a prompt: text spans and embedding blocks.

An engine turns one input into a sequence of spans, as llama.cpp's mtmd returns them: text
tokens (wrappers such as ``<start_of_image>``, tile separators, row breaks) and blocks of
embedding rows (an overview, a slice, a tile, an audio window). A LLaVA image is one block.
A block says how many KV cells it fills (``n_tokens``), how far it advances the position
(``n_pos``: equal to ``n_tokens`` except for M-RoPE models, where a whole image advances by
max(rows, columns)), and whether it is decoded with causal attention off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TextSpan:
    """Text tokens the engine puts inside a media item (wrappers, separators).

    ``text``: a closing wrapper the model's processor tokenized together with the prompt text
    that follows it (NVLM-D's ``</Image>``: with Qwen2's BPE ``>\n`` is one token); the
    span then has no tokens, and the runtime prepends ``text`` to the following text before
    tokenizing it. Not part of equality or of the cached layout.
    """

    tokens: tuple[int, ...]
    text: str = field(default="", compare=False)


@dataclass(frozen=True)
class EmbedSpan:
    """A block of embedding rows (one encoder output: a tile, an overview, audio)."""

    n_tokens: int
    n_pos: int = 0
    """Positions this block advances (0: ``n_tokens``)."""
    non_causal: bool = False

    @property
    def advance(self) -> int:
        return self.n_pos or self.n_tokens


Span = TextSpan | EmbedSpan
Layout = tuple[Span, ...]


def single_block(n_tokens: int, *, non_causal: bool = False) -> Layout:
    return (EmbedSpan(int(n_tokens), 0, non_causal),)


def layout_rows(layout: Layout) -> int:
    """Embedding rows of a layout (what the encoder outputs)."""
    return sum(s.n_tokens for s in layout if isinstance(s, EmbedSpan))


def layout_cells(layout: Layout) -> int:
    """KV cells a media item fills (text tokens + embedding rows)."""
    return sum(len(s.tokens) if isinstance(s, TextSpan) else s.n_tokens for s in layout)


def layout_advance(layout: Layout) -> int:
    """Positions a media item advances."""
    return sum(len(s.tokens) if isinstance(s, TextSpan) else s.advance for s in layout)


def layout_to_array(layout: Layout) -> np.ndarray:
    """A layout as a flat int32 array (for the disk cache): text spans as ``0, n, ids…``,
    blocks as ``1, n_tokens, n_pos, non_causal``."""
    flat: list[int] = []
    for s in layout:
        if isinstance(s, TextSpan):
            flat += [0, len(s.tokens), *s.tokens]
        else:
            flat += [1, s.n_tokens, s.n_pos, int(s.non_causal)]
    return np.asarray(flat, dtype=np.int32)


def layout_from_array(arr: np.ndarray) -> Layout:
    flat = [int(x) for x in np.atleast_1d(arr)]
    out: list[Span] = []
    i = 0
    while i < len(flat):
        kind, n = flat[i], flat[i + 1]
        if kind == 0:
            out.append(TextSpan(tuple(flat[i + 2 : i + 2 + n])))
            i += 2 + n
        elif kind == 1:
            out.append(EmbedSpan(n, flat[i + 2], bool(flat[i + 3])))
            i += 4
        else:
            raise ValueError(f"bad layout entry kind {kind}")
    return tuple(out)
