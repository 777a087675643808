"""Encoder-decoder text models (Flan-T5 for BLIP-2 / InstructBLIP) behind ``TextBackend``.

The runtime's sequence (``KVSequence``) counts positions: the prompt's cells, then the
generated tokens. :class:`EncoderDecoderBackend` keeps, per position, what the cell holds (an
input row, or a token id) and maps that onto llama.cpp's T5:

- prompt calls (``decode_tokens`` / ``decode_embeddings``) append cells to the **encoder
  input**: image rows as given, token ids turned into rows with the model's token-embedding
  table (read from the GGUF, dequantized row by row). Nothing runs until a call asks for
  logits (``logits_last``, the prompt's last cell): then ``llama_encode`` runs on the whole
  input as one micro-batch (``n_ubatch`` = the context, so every prompt that fits the context
  fits), the decoder's cache is cleared and ``decoder_start_token_id`` is decoded: its logits
  are the prompt's "last-position" logits.
- ``decode_one`` (generation) feeds a token to the **decoder**: cell ``n_enc + i`` is decoder
  position ``i + 1`` (position 0 is the start token).
- ``truncate(n)`` is always exact: cells past ``n`` are forgotten. When only generated tokens
  go, the decoder's cache is cut to match; otherwise the encoder output is stale and the
  decoder is dropped, and the next logits request encodes again. A prompt call after a reply
  makes the generated tokens part of the encoder input (they are the reply's token ids, which
  the re-rendered conversation repeats where the prefix matched); the encoder is
  bidirectional, so every turn encodes the whole conversation again (``KVSequence`` always
  decodes the prompt's last cell with logits, so no turn can see an older encoder output).

One sequence only: llama.cpp keeps one encoder output per context, so the loader serves these
models with ``n_parallel = 1`` and without the batch scheduler (``force_single``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mmchat.errors import CorruptFileError, UserError
from mmchat.gguf_meta import GGUFInfo
from mmchat.runtime import _llama
from mmchat.runtime.options import LoadOptions

ENCODER_DECODER_ARCHS = ("t5",)


def is_encoder_decoder(info: GGUFInfo) -> bool:
    """Whether a text GGUF is an encoder-decoder model (the loader's switch)."""
    return info.architecture in ENCODER_DECODER_ARCHS


def force_single(opts: LoadOptions) -> LoadOptions:
    """The options an encoder-decoder model is served with: one sequence, no scheduler
    (llama.cpp holds one encoder output per context)."""
    if opts.n_parallel == 1 and not opts.scheduled:
        return opts
    return replace(opts, n_parallel=1, scheduled=False)


class TokenRows:
    """The token-embedding table (``token_embd.weight``) of a text GGUF, read row by row."""

    def __init__(self, path: str | Path, n_embd: int) -> None:
        from gguf import GGUFReader
        from gguf.quants import dequantize

        self._dequantize = dequantize
        try:
            reader = GGUFReader(str(path))
        except (OSError, ValueError) as exc:
            raise CorruptFileError(f"Cannot read the token embeddings of {path}: {exc}") from None
        found = [t for t in reader.tensors if t.name == "token_embd.weight"]
        if not found:
            raise CorruptFileError(f"{path} has no token_embd.weight")
        t = found[0]
        self._data: Any = t.data
        self._type = t.tensor_type
        self.n_embd = int(n_embd)
        if int(t.shape[0]) != self.n_embd:
            raise CorruptFileError(f"token_embd.weight of {path} is not {n_embd} wide")

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 ``(len(ids), n_embd)``."""
        if self._data is None:
            raise RuntimeError("the token table is closed")
        raw = np.asarray(self._data[np.asarray(ids, dtype=np.int64)])
        out = self._dequantize(raw, self._type)
        return np.ascontiguousarray(out.reshape(len(ids), self.n_embd), dtype=np.float32)

    def close(self) -> None:
        """Drop the file mapping."""
        self._data = None


class EncoderDecoderBackend:
    """``TextBackend`` of an encoder-decoder GGUF (see the module doc)."""

    def __init__(
        self,
        model: _llama.TextModel,
        path: str | Path,
        *,
        n_ctx: int,
        n_threads: int | None,
        flash_attn: bool | None,
        kv_cache_type: str,
    ) -> None:
        start = model.decoder_start if model.decoder_start >= 0 else model.bos
        if start < 0:
            raise CorruptFileError(f"{path} names no decoder start token")
        self.start = start
        self.model = model
        self.table = TokenRows(path, model.n_embd_inp)
        # the encoder takes the whole prompt in one micro-batch: n_ubatch = n_batch = n_ctx
        self.ctx = _llama.Context(
            model,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=n_threads,
            flash_attn=flash_attn,
            kv_cache_type=kv_cache_type,
        )
        self.n_ctx = self.ctx.n_ctx
        self.n_ctx_seq = self.n_ctx
        self.n_embd_image = 0
        self.n_batch = self.ctx.n_batch
        self.n_ubatch = self.ctx.n_ubatch
        self.n_threads = self.ctx.n_threads
        n = self.n_ctx
        self._rows = np.zeros((n, model.n_embd_inp), dtype=np.float32)
        self._ids = np.full(n, -1, dtype=np.int64)
        """Per cell: its token id, or -1 for an input row."""
        self._embedded = np.zeros(n, dtype=bool)
        """Per cell: whether ``_rows`` holds its encoder input row (not yet for a generated
        token)."""
        self._n = 0
        """Cells held."""
        self._n_enc = -1
        """Cells the current encoder output covers; -1 when there is none (stale)."""

    @property
    def n_pos_per_embd(self) -> int:
        return 1

    # -- bookkeeping --

    def _check_pos(self, pos: int | np.ndarray, n: int) -> None:
        first = int(pos.reshape(-1)[0]) if isinstance(pos, np.ndarray) else int(pos)
        if isinstance(pos, np.ndarray) and not np.array_equal(
            pos.reshape(-1), np.arange(first, first + n)
        ):
            raise ValueError("an encoder-decoder sequence takes consecutive positions")
        if first != self._n:
            raise ValueError(f"cells are appended at position {self._n}, not {first}")
        if self._n + n > self.n_ctx:
            raise _llama.DecodeError(1, "the context is full (no room left in the KV cache)")

    def _stale(self) -> None:
        if self._n_enc >= 0:
            self._n_enc = -1
            self.ctx.clear()

    def _encode_and_start(self) -> None:
        n = self._n
        todo = np.flatnonzero(~self._embedded[:n])
        if todo.size:  # generated tokens now part of a prompt
            self._rows[todo] = self.table.rows(self._ids[todo])
            self._embedded[todo] = True
        self.ctx.clear()
        self.ctx.encode_embeddings(self._rows[:n])
        self.ctx.decode_tokens(np.array([self.start], dtype=np.int32), 0, logits_last=True)
        self._n_enc = n

    def _append_prompt(self, rows: np.ndarray, ids: np.ndarray, logits_last: bool) -> None:
        a, b = self._n, self._n + len(rows)
        self._stale()
        self._rows[a:b] = rows
        self._ids[a:b] = ids
        self._embedded[a:b] = True
        self._n = b
        if logits_last:
            self._encode_and_start()

    # -- TextBackend --

    def decode_tokens(
        self, tokens: np.ndarray, pos: int | np.ndarray, *, logits_last: bool, seq_id: int = 0
    ) -> None:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if seq_id != 0:
            raise ValueError("an encoder-decoder backend has one sequence")
        if ids.size and (ids.min() < 0 or ids.max() >= self.model.n_vocab):
            raise UserError(f"token id outside the vocabulary ({self.model.n_vocab})")
        self._check_pos(pos, len(ids))
        self._append_prompt(self.table.rows(ids), ids, logits_last)

    def decode_embeddings(
        self,
        embd: np.ndarray,
        pos: int | np.ndarray,
        *,
        logits_last: bool,
        non_causal: bool = False,
        seq_id: int = 0,
    ) -> None:
        if embd.ndim != 2 or embd.shape[1] != self.model.n_embd_inp:
            raise ValueError(
                f"embeddings of shape {embd.shape} do not fit n_embd={self.model.n_embd_inp}"
            )
        if seq_id != 0:
            raise ValueError("an encoder-decoder backend has one sequence")
        self._check_pos(pos, len(embd))
        ids = np.full(len(embd), -1, dtype=np.int64)
        self._append_prompt(np.asarray(embd, dtype=np.float32), ids, logits_last)

    def decode_one(self, token: int, pos: int, seq_id: int = 0) -> None:
        if self._n_enc < 0:  # nothing encoded for what is held: the token ends a prompt
            self.decode_tokens(np.array([token]), pos, logits_last=True, seq_id=seq_id)
            return
        self._check_pos(int(pos), 1)
        dec_pos = self._n - self._n_enc + 1
        self.ctx.decode_one(int(token), dec_pos)
        self._ids[self._n] = int(token)
        self._embedded[self._n] = False
        self._n += 1

    def pos_max(self, seq_id: int = 0) -> int:
        return self._n - 1

    def truncate(self, n_keep: int, seq_id: int = 0) -> bool:
        n_keep = max(0, int(n_keep))
        if n_keep >= self._n:
            return True
        if self._n_enc >= 0 and n_keep >= self._n_enc:
            # only generated tokens go: cut the decoder's cache after the ones kept
            if not self.ctx.truncate(n_keep - self._n_enc + 1):
                self._stale()
        else:
            self._stale()
        self._n = n_keep
        return True

    def clear(self) -> None:
        self._n = 0
        self._stale()
        self.ctx.clear()

    def last_logits(self) -> np.ndarray:
        return self.ctx.last_logits()

    def perf(self) -> dict[str, float]:
        return self.ctx.perf()

    def close(self) -> None:
        self.ctx.close()
        self.table.close()

    # -- introspection (tests, /show) --

    @property
    def encoder_cells(self) -> int:
        """Cells the current encoder output covers (-1: none, the next prompt encodes)."""
        return self._n_enc
