"""``KVSequence``: what one sequence of a context holds, and bringing it to a new prompt.

The sequence remembers each KV cell's identity (``Unit``) and the position it was decoded
at, so a new prompt is evaluated as "longest common prefix kept, the rest decoded". The cut
never falls inside a media item (its rows only make sense whole, and M-RoPE positions of an
image are not consecutive). Positions advance by each piece's ``n_pos``, so text after an
M-RoPE image continues where llama.cpp's helper would put it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mmchat.errors import UserError
from mmchat.runtime.backend import TextBackend
from mmchat.runtime.pieces import (
    EmbedRun,
    PromptItem,
    PromptMedia,
    TokenRun,
    Unit,
    block_positions,
    decode_runs,
    prompt_units,
    run_advance,
    run_cells,
)


@dataclass
class Chunk:
    """Cells of one sequence to decode in one batch: tokens or embedding rows, their
    positions (section-major for M-RoPE rows), and what the sequence holds after them."""

    tokens: np.ndarray | None
    embd: np.ndarray | None
    pos: np.ndarray
    units: list[Unit]
    cell_pos: list[int]
    next_pos: int
    last: bool
    """Holds the prompt's last cell (its logits are needed)."""
    non_causal: bool = False


class ContextOverflowError(UserError):
    """A prompt needs more KV cells than the context has."""

    def __init__(self, needed: int, n_ctx: int, message: str | None = None) -> None:
        super().__init__(
            message
            or f"the prompt needs {needed} tokens but the context holds {n_ctx} "
            "(start with a larger context, e.g. --ctx)"
        )
        self.needed = needed
        self.n_ctx = n_ctx


class KVSequence:
    """One sequence (``seq_id``) of a backend's KV cache."""

    def __init__(self, backend: TextBackend, seq_id: int = 0) -> None:
        self.backend = backend
        self.seq_id = seq_id
        self.units: list[Unit] = []
        self.cell_pos: list[int] = []
        """The position each cell was decoded at (the t section for M-RoPE rows)."""
        self.next_pos = 0

    def __len__(self) -> int:
        return len(self.units)

    # -- bookkeeping --

    def reset(self) -> None:
        self.backend.truncate(0, self.seq_id)
        self.units = []
        self.cell_pos = []
        self.next_pos = 0

    def _forget_from(self, k: int) -> None:
        if k < len(self.units):
            self.next_pos = self.cell_pos[k] if k else 0
            del self.units[k:]
            del self.cell_pos[k:]

    def cut(self, k: int) -> int:
        """Keep the first ``k`` cells; returns how many are kept (0 when the backend could
        not cut, and the sequence was emptied)."""
        if k >= len(self.units):
            return len(self.units)
        pos = self.cell_pos[k] if k else 0
        if not self.backend.truncate(pos, self.seq_id):
            self.reset()
            return 0
        self._forget_from(k)
        return k

    def sync(self) -> None:
        """Agree with the backend again after an interruption or a failed decode."""
        held = self.backend.pos_max(self.seq_id)
        if held < 0:
            self.units, self.cell_pos, self.next_pos = [], [], 0
            return
        k = len(self.units)
        while k and self.cell_pos[k - 1] > held:
            k -= 1
        self._forget_from(k)
        if held >= self.next_pos and not self.backend.truncate(self.next_pos, self.seq_id):
            self.reset()

    # -- prompts --

    def common_prefix(
        self, items: Sequence[PromptItem], units: Sequence[Unit] | None = None
    ) -> int:
        """Cells of ``items`` already held, never ending inside a media item, and leaving at
        least the last cell to decode (its logits are needed). ``units``: the prompt's units
        when the caller has them already."""
        if units is None:
            units = prompt_units(items)
        limit = min(len(units), len(self.units))
        k = 0
        while k < limit and units[k] == self.units[k]:
            k += 1
        if k == len(units):
            k -= 1
        start = 0
        for it in items:
            n = it.cells if isinstance(it, PromptMedia) else len(it)
            if isinstance(it, PromptMedia) and start < k < start + n:
                return start
            start += n
        return k

    def chunks(
        self, items: Sequence[PromptItem], start: int, n_batch: int | None = None
    ) -> Iterator[Chunk]:
        """The cells of ``items`` from cell ``start`` on (the first ``start`` are held), in
        the chunks llama.cpp's helper decodes: merged token runs split by ``n_batch``, and
        each embedding block whole when non-causal, else split by ``n_batch``. Apply each
        with the backend, then ``commit`` it."""
        be = self.backend
        n_batch = n_batch or be.n_batch
        nppe = be.n_pos_per_embd
        total = sum(run_cells(r) for r in decode_runs(items))
        cell = 0
        pos = 0
        for run in decode_runs(items):
            n = run_cells(run)
            adv = run_advance(run)
            if cell + n <= start:
                cell += n
                pos += adv
                continue
            lo = max(start - cell, 0)
            if isinstance(run, TokenRun):
                arr = np.asarray(run.tokens, dtype=np.int32)
                for a in range(lo, n, n_batch):
                    b = min(a + n_batch, n)
                    yield Chunk(
                        tokens=arr[a:b],
                        embd=None,
                        pos=np.arange(pos + a, pos + b, dtype=np.int32),
                        units=list(run.tokens[a:b]),
                        cell_pos=list(range(pos + a, pos + b)),
                        next_pos=pos + b if b < n else pos + adv,
                        last=cell + b == total,
                    )
            else:
                yield from self._block_chunks(run, lo, pos, cell, total, nppe, n_batch)
            cell += n
            pos += adv

    def _block_chunks(
        self, run: EmbedRun, lo: int, pos: int, cell: int, total: int, nppe: int, n_batch: int
    ) -> Iterator[Chunk]:
        media = run.media
        if lo:
            raise RuntimeError("a media block cannot be decoded from its middle")
        emb = media.embeddings
        if emb is None:
            raise RuntimeError(f"media {media.key[:12]} was not encoded")
        n = run.span.n_tokens
        rows = emb[run.row : run.row + n]
        positions = block_positions(run, pos, nppe).reshape(nppe, n)
        if run.span.non_causal:
            if n > self.backend.n_ubatch:
                raise UserError(
                    f"this image needs {n} tokens in one batch but the batch size is "
                    f"{self.backend.n_ubatch} (load with a larger n_batch)"
                )
            step = n
        else:
            step = n_batch
        for a in range(0, n, step):
            b = min(a + step, n)
            yield Chunk(
                tokens=None,
                embd=rows[a:b],
                pos=np.ascontiguousarray(positions[:, a:b]).reshape(-1),
                units=[(media.key, run.row + j) for j in range(a, b)],
                cell_pos=[int(p) for p in positions[0, a:b]],
                next_pos=pos + run.span.advance if b == n else int(positions[0, b - 1]) + 1,
                last=cell + b == total,
                non_causal=run.span.non_causal,
            )

    def commit(self, chunk: Chunk) -> None:
        """Record a chunk the backend has decoded."""
        self.units.extend(chunk.units)
        self.cell_pos.extend(chunk.cell_pos)
        self.next_pos = chunk.next_pos

    def apply(self, chunk: Chunk) -> None:
        """Decode one chunk of this sequence alone (logits for its last cell if it ends the
        prompt), and record it."""
        be = self.backend
        if chunk.tokens is not None:
            be.decode_tokens(chunk.tokens, chunk.pos, logits_last=chunk.last, seq_id=self.seq_id)
        else:
            assert chunk.embd is not None
            be.decode_embeddings(
                chunk.embd,
                chunk.pos,
                logits_last=chunk.last,
                non_causal=chunk.non_causal,
                seq_id=self.seq_id,
            )
        self.commit(chunk)

    def decode(
        self,
        items: Sequence[PromptItem],
        start: int,
        cancel: threading.Event | None = None,
    ) -> None:
        """Decode the cells of ``items`` from cell ``start`` on, chunk by chunk."""
        for chunk in self.chunks(items, start):
            _check(cancel)
            self.apply(chunk)

    def append_token(self, token: int, n_ctx: int) -> None:
        """Decode one generated token after the held cells."""
        if len(self.units) >= n_ctx:
            raise ContextOverflowError(len(self.units) + 1, n_ctx)
        pos = self.next_pos
        try:
            self.backend.decode_one(token, pos, self.seq_id)
        except BaseException:
            self.sync()
            raise
        self.units.append(token)
        self.cell_pos.append(pos)
        self.next_pos = pos + 1


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise KeyboardInterrupt
