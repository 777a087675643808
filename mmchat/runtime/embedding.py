"""Embeddings of a loaded model, through llama.cpp's own embedding path.

An :class:`Embedder` is a second llama.cpp context on the weights of a ``LoadedModel``
(nothing is loaded twice) with ``embeddings`` on:

- **Pooling.** A GGUF that names a pooling (``<arch>.pooling_type``: BERT, nomic-bert and
  the other dedicated embedding models) is pooled that way; a chat model (no pooling in its
  file) is mean-pooled over the last hidden layer of every input position.
- **Tokens.** The text is tokenized like a prompt (BOS/CLS and EOS/SEP where the vocabulary
  asks for them, special tokens parsed), with no chat template.
- **Length.** Each input is decoded in one micro-batch of at most ``n_ctx`` positions;
  longer inputs are truncated (``truncate=True``, Ollama's default) or refused.
- The vectors are returned as llama.cpp computes them; :func:`normalize` is Ollama's L2
  normalisation (``/api/embed`` and ``/v1/embeddings`` apply it, ``/api/embeddings`` not).

The caller serialises use (the model's lock) and closes the embedder before the model.
The llama.cpp calls of the embedding context live here (next to ``_llama``, whose helpers
they use) rather than in ``_llama`` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mmchat.errors import UserError
from mmchat.runtime import _llama

C = _llama.C

if TYPE_CHECKING:
    from mmchat.runtime.model import LoadedModel

MAX_EMBED_CTX = 8192
"""Largest embedding context by default (its compute buffer grows with it)."""


# --- the llama.cpp side: a context with embeddings on -------------------------------------

POOLING_TYPES = {"none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}


class EmbeddingContext:
    """A ``llama_context`` with embeddings on, over an already loaded ``TextModel``.

    The whole input is decoded in one micro-batch (``n_ubatch == n_ctx``): non-causal
    (BERT-style) models need that, and pooling is computed per micro-batch. Free it with
    ``close()`` before the ``TextModel`` it uses.
    """

    def __init__(
        self,
        model: _llama.TextModel,
        *,
        n_ctx: int,
        n_threads: int | None,
        flash_attn: bool | None,
        kv_cache_type: str,
        pooling: str | None,
    ) -> None:
        self.model = model
        params = C.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = int(n_ctx)
        params.n_seq_max = 1
        threads = int(n_threads or _llama.usable_cpus())
        params.n_threads = params.n_threads_batch = threads
        params.embeddings = True
        params.pooling_type = -1 if pooling is None else POOLING_TYPES[pooling]
        if flash_attn is None:
            params.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_AUTO
        elif flash_attn:
            params.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED
        else:
            params.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
        kv_type = _llama.GGML_TYPES.get(kv_cache_type)
        if kv_type is None:
            raise UserError(f"this llama.cpp build has no KV cache type {kv_cache_type!r}")
        params.type_k = params.type_v = kv_type
        _llama.clear_recent_errors()
        ptr = C.llama_init_from_model(model.ptr, params)
        if not ptr:
            why = _llama.recent_errors()
            raise UserError(
                "llama.cpp could not create an embedding context" + (f": {why}" if why else "")
            )
        self.ptr: Any = ptr
        # llama.cpp may round n_ctx up (to a multiple of 256) but not n_ubatch, and a
        # sequence longer than n_ubatch aborts the process (GGML_ASSERT): the smaller counts
        self.n_ctx = min(int(C.llama_n_ctx(ptr)), int(C.llama_n_ubatch(ptr)))
        kind = int(C.llama_pooling_type(ptr))
        self.pooling = next((k for k, v in POOLING_TYPES.items() if v == kind), str(kind))

    def embed(self, tokens: list[int]) -> np.ndarray:
        """The pooled embedding (float32, ``n_embd``) of one token sequence."""
        if not tokens or len(tokens) > self.n_ctx:
            raise ValueError(
                f"{len(tokens)} tokens do not fit the embedding context ({self.n_ctx})"
            )
        C.llama_memory_clear(C.llama_get_memory(self.ptr), True)
        batch = _llama._Batch(0, tokens=np.asarray(tokens, dtype=np.int32))
        batch.logits[:] = 1  # every position is an output in embedding mode
        rc = int(C.llama_decode(self.ptr, batch.struct))
        if rc != 0:
            why = _llama.recent_errors()
            raise _llama.DecodeError(
                rc, f"llama_decode failed ({rc}) while embedding" + (f": {why}" if why else "")
            )
        ptr = C.llama_get_embeddings_seq(self.ptr, 0)
        if not ptr:
            raise RuntimeError("llama.cpp returned no pooled embedding")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_embd,)).astype(np.float32)

    def close(self) -> None:
        if self.ptr:
            C.llama_free(self.ptr)
            self.ptr = None


class InputTooLongError(UserError):
    """An input has more tokens than the embedding context and truncation is off."""


class Embedder:
    """Embeddings of ``model``'s text through an embedding context over its weights."""

    def __init__(self, model: LoadedModel, *, n_ctx: int | None = None) -> None:
        text = model.text
        stored = model.info.arch_key("pooling_type")
        if stored == POOLING_TYPES["rank"]:
            raise UserError(
                f"{model.path.name} is a reranking model (pooling 'rank'): it scores pairs "
                "of texts and has no embeddings"
            )
        if text.has_encoder:  # llama_decode without llama_encode aborts the process
            raise UserError(
                f"{model.path.name} is an encoder-decoder model (T5): mmchat computes no "
                "embeddings with it"
            )
        self.pooling_from_file = isinstance(stored, int) and stored != 0
        train = text.n_ctx_train or model.n_ctx
        size = n_ctx or min(model.n_ctx, train, MAX_EMBED_CTX)
        opts = model.options
        self._model = model
        self._ctx: EmbeddingContext | None = EmbeddingContext(
            text,
            n_ctx=size,
            n_threads=opts.n_threads,
            flash_attn=opts.flash_attn,
            kv_cache_type=opts.kv_cache_type,
            pooling=None if self.pooling_from_file else "mean",
        )
        self.n_ctx = self._ctx.n_ctx
        self.n_embd = text.n_embd
        self.pooling = self._ctx.pooling

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def tokenize(self, text: str) -> list[int]:
        return self._model.text.tokenize(text, add_special=True, parse_special=True)

    def fit(self, tokens: Sequence[int], *, truncate: bool, what: str = "the input") -> list[int]:
        """``tokens`` cut to the context (``truncate``) or an ``InputTooLongError``."""
        ids = [int(t) for t in tokens]
        if len(ids) <= self.n_ctx:
            return ids
        if not truncate:
            raise InputTooLongError(
                f"{what} has {len(ids)} tokens but the embedding context holds {self.n_ctx} "
                "(send it with truncate on, or shorter)"
            )
        return ids[: self.n_ctx]

    def embed_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        """The pooled, unnormalised float32 embedding of one token sequence."""
        if self._ctx is None:
            raise RuntimeError("the embedder is closed")
        ids = [int(t) for t in tokens]
        if not ids:
            raise UserError("an input is empty: it has no tokens to embed")
        n_vocab = self._model.text.n_vocab
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise UserError(f"token id {bad} is outside the vocabulary ({n_vocab})")
        return self._ctx.embed(ids)

    def embed(self, text: str, *, truncate: bool = True) -> tuple[np.ndarray, int]:
        """(unnormalised embedding, tokens used) of one text."""
        ids = self.fit(self.tokenize(text), truncate=truncate)
        return self.embed_tokens(ids), len(ids)

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None


def normalize(vec: np.ndarray) -> np.ndarray:
    """L2-normalised copy (Ollama's ``normalize``: NaN/Inf refused, norm floored at 1e-12)."""
    v = np.asarray(vec, dtype=np.float32)
    if not np.all(np.isfinite(v)):
        raise UserError("the embedding contains NaN or Inf values")
    norm = float(np.sqrt(np.sum(v.astype(np.float64) ** 2)))
    return (v / max(norm, 1e-12)).astype(np.float32)


def open_embedder(model: LoadedModel, *, n_ctx: int | None = None) -> Embedder:
    """An :class:`Embedder` for ``model`` (close it before the model)."""
    return Embedder(model, n_ctx=n_ctx)
