"""A prompt as the runtime decodes it: token runs and media items made of pieces.

A media item (an image or an audio clip) is what the vision/audio engine turns one input
into, as llama.cpp's mtmd returns it: a sequence of *spans*, each either text tokens (wrapper
and separator tokens such as ``<start_of_image>``, tile tags, row breaks) or a block of
embedding rows (an overview, a slice, a tile, an audio window). A LLaVA image is one block.

Each embedding block says how many KV cells it fills (``n_tokens``), how far it advances the
position (``n_pos``: equal to ``n_tokens`` except for M-RoPE models, where a whole image
advances by max(rows, columns)), and whether it is decoded with causal attention off.

The KV cells of a prompt are identified by ``Unit``s: a text token by its id, an embedding
row by ``(media key, row)``. Two prompts share a KV prefix exactly as far as their units are
equal; the context is never cut inside a media item.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from mmchat.vision.layout import (
    EmbedSpan,
    Layout,
    Span,
    TextSpan,
    layout_cells,
    layout_rows,
    single_block,
)

__all__ = [
    "EmbedRun",
    "EmbedSpan",
    "Layout",
    "PromptImage",
    "PromptItem",
    "PromptMedia",
    "Span",
    "TextSpan",
    "TokenRun",
    "Unit",
    "count_positions",
    "decode_runs",
    "prompt_units",
    "single_block",
]

Unit = int | tuple[str, int]
"""A KV cell: a token id, or (media key, embedding row) for an embedding row."""


@dataclass
class PromptMedia:
    """One image or audio clip in a prompt.

    ``layout`` is known before encoding (from the engine, or from a previous encode);
    ``embeddings`` (all rows of all blocks, in order) only after encoding. ``rel_pos``: for
    M-RoPE models, ``(rows, 4)`` section positions (t, y, x, z) of every row for a block
    starting at position 0, and ``pos_shift`` which of the four move with the start.
    """

    key: str
    source: object
    layout: Layout
    embeddings: np.ndarray | None = None
    rel_pos: np.ndarray | None = field(default=None, repr=False)
    pos_shift: tuple[int, int, int, int] = (1, 1, 1, 1)

    @property
    def cells(self) -> int:
        return layout_cells(self.layout)

    @property
    def positions(self) -> int:
        """KV cells it fills (what counts against the context size)."""
        return self.cells

    @property
    def n_tokens(self) -> int:
        """Embedding rows."""
        return layout_rows(self.layout)

    @property
    def non_causal(self) -> bool:
        return any(isinstance(s, EmbedSpan) and s.non_causal for s in self.layout)

    def units(self) -> list[Unit]:
        out: list[Unit] = []
        row = 0
        for s in self.layout:
            if isinstance(s, TextSpan):
                out.extend(s.tokens)
            else:
                out.extend((self.key, row + j) for j in range(s.n_tokens))
                row += s.n_tokens
        return out


# kept for callers written before media had pieces
PromptImage = PromptMedia

PromptItem = list[int] | PromptMedia


def count_positions(items: Sequence[PromptItem]) -> int:
    """KV cells the prompt fills (what must fit in the context)."""
    return sum(it.cells if isinstance(it, PromptMedia) else len(it) for it in items)


def prompt_units(items: Sequence[PromptItem]) -> list[Unit]:
    out: list[Unit] = []
    for it in items:
        out.extend(it.units() if isinstance(it, PromptMedia) else it)
    return out


@dataclass
class TokenRun:
    """Consecutive text tokens (adjacent text of the prompt and of media items merged, as
    mtmd's tokenizer merges them into one chunk)."""

    tokens: list[int]


@dataclass
class EmbedRun:
    """One embedding block of a media item."""

    media: PromptMedia
    row: int
    """First row of the block within the media item's embeddings."""
    span: EmbedSpan


Run = TokenRun | EmbedRun


def decode_runs(items: Sequence[PromptItem]) -> Iterator[Run]:
    """The prompt in the chunks llama.cpp's helper decodes: merged token runs and blocks."""
    pending: list[int] = []
    for it in items:
        if not isinstance(it, PromptMedia):
            pending.extend(it)
            continue
        row = 0
        for s in it.layout:
            if isinstance(s, TextSpan):
                pending.extend(s.tokens)
                continue
            if pending:
                yield TokenRun(pending)
                pending = []
            yield EmbedRun(it, row, s)
            row += s.n_tokens
    if pending:
        yield TokenRun(pending)


def run_cells(run: Run) -> int:
    return len(run.tokens) if isinstance(run, TokenRun) else run.span.n_tokens


def run_advance(run: Run) -> int:
    return len(run.tokens) if isinstance(run, TokenRun) else run.span.advance


def block_positions(run: EmbedRun, pos0: int, n_pos_per_embd: int) -> np.ndarray:
    """Positions of a block's rows for ``llama_batch.pos``: ``(n,)`` or section-major
    ``(n_pos_per_embd * n,)`` (t…, y…, x…, z…) for M-RoPE models."""
    n = run.span.n_tokens
    if n_pos_per_embd == 1:
        if run.span.advance < n:  # rows that share positions (IDEFICS: one <image> token)
            return np.full(n, pos0, dtype=np.int32)
        return np.arange(pos0, pos0 + n, dtype=np.int32)
    rel = run.media.rel_pos
    if rel is None:  # a block without 2-D positions (audio, raw embeddings): 1-D in every section
        line = np.arange(pos0, pos0 + n, dtype=np.int32)
        return np.tile(line, n_pos_per_embd)
    block = np.asarray(rel[run.row : run.row + n], dtype=np.int64)
    shift = np.asarray(run.media.pos_shift, dtype=np.int64) * pos0
    out = (block + shift).astype(np.int32)  # (n, 4)
    return np.ascontiguousarray(out.T[:n_pos_per_embd]).reshape(-1)
