"""Thin, typed wrappers over llama-cpp-python's low-level ctypes API (``llama_cpp.llama_cpp``).

Everything that touches a raw llama.cpp pointer lives here: backend start-up, logging,
model/context lifetime, tokenization, detokenization and batched decoding of token ids or
embeddings. The rest of the runtime works with Python ints, bytes and numpy arrays.

ctypes rule (DESIGN §6): every array handed to a ``llama_batch`` is owned by a Python
object that lives until ``llama_decode`` has returned (see ``_Batch``).
"""

from __future__ import annotations

import collections
import ctypes
import os
import sys
import threading
from typing import Any

import numpy as np

from mmchat.errors import UserError
from mmchat.native.cpu import extra_buffers_usable

# Importing the package (not only the submodule) first matters: it loads the ggml/llama
# shared libraries that the native vision library must then reuse (DESIGN §6).
import llama_cpp  # noqa: F401  # isort: skip
import llama_cpp.llama_cpp as C  # isort: skip

_init_lock = threading.Lock()
_backend_ready = False

# --- logging ---------------------------------------------------------------------------

_log_state = {"verbose": False}
_recent_log: collections.deque[str] = collections.deque(maxlen=40)
_GGML_LOG_ERROR = 3
_GGML_LOG_WARN = 2
_GGML_LOG_CONT = 5
_last_level = [0]


def _log_callback(level: int, text: bytes | None, _user: Any) -> None:
    try:
        msg = (text or b"").decode("utf-8", errors="replace")
        if level == _GGML_LOG_CONT:
            level = _last_level[0]
        _last_level[0] = level
        if level in (_GGML_LOG_ERROR, _GGML_LOG_WARN) and msg.strip():
            _recent_log.append(msg.rstrip())
        if _log_state["verbose"]:
            sys.stderr.write(msg)
            sys.stderr.flush()
    except Exception:  # a ctypes callback must never raise
        pass


# Kept at module level for the life of the process: llama.cpp holds the raw pointer.
_LOG_CB = C.llama_log_callback(_log_callback)


def set_verbose(verbose: bool) -> None:
    """Route llama.cpp's log to stderr (verbose) or keep only its warnings for error messages."""
    _log_state["verbose"] = bool(verbose)
    C.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


# Quiet from the start: llama-cpp-python's own callback prints every log line to stderr.
C.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


def recent_errors(n: int = 3) -> str:
    """The last few warning/error lines llama.cpp logged (to explain a failure)."""
    lines = [ln for ln in _recent_log if ln][-n:]
    return " | ".join(lines)


def clear_recent_errors() -> None:
    _recent_log.clear()


def ensure_backend(verbose: bool = False) -> None:
    global _backend_ready
    with _init_lock:
        set_verbose(verbose)
        if not _backend_ready:
            C.llama_backend_init()
            _backend_ready = True


def supports_gpu_offload() -> bool:
    return bool(C.llama_supports_gpu_offload())


def system_info() -> str:
    return bytes(C.llama_print_system_info() or b"").decode("utf-8", errors="replace")


GGML_TYPES = {"f32": C.GGML_TYPE_F32, "f16": C.GGML_TYPE_F16}
# Types this binding may not name; ggml's enum values are stable.
for _name, _value in (("q8_0", 8), ("q4_0", 2), ("bf16", 30)):
    GGML_TYPES[_name] = int(getattr(C, f"GGML_TYPE_{_name.upper()}", _value))


def usable_cpus() -> int:
    """CPUs this process may run on (affinity mask / container limits where known)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class DecodeError(RuntimeError):
    """llama_decode failed; ``code`` is its return value (1 = no room in the KV cache)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- model ------------------------------------------------------------------------------


class TextModel:
    """A loaded ``llama_model`` and its vocabulary."""

    has_encoder: bool = False
    """An encoder-decoder model (T5): prompts go through ``Context.encode_embeddings``."""
    decoder_start: int = -1
    """The decoder's first token of an encoder-decoder model (-1: none given)."""

    def __init__(
        self,
        path: str,
        *,
        n_gpu_layers: int,
        verbose: bool = False,
        tensor_split: tuple[float, ...] | None = None,
    ) -> None:
        ensure_backend(verbose)
        params = C.llama_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers)
        if tensor_split:  # proportions per GPU-type device (RPC devices first)
            n_max = int(C.llama_max_devices())
            if len(tensor_split) > n_max:
                raise UserError(f"tensor split names {len(tensor_split)} devices, most is {n_max}")
            split = (ctypes.c_float * n_max)(*[float(x) for x in tensor_split])
            self._tensor_split = split  # llama.cpp reads it during the load only
            params.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
        # llama.cpp's AMX/repacked CPU buffers crash on CPUs that advertise AMX but fault
        # on it (some VMs); mmchat.native.cpu self-tests them once per machine.
        params.use_extra_bufts = extra_buffers_usable()
        clear_recent_errors()
        ptr = C.llama_model_load_from_file(path.encode("utf-8"), params)
        if not ptr:
            why = recent_errors()
            raise UserError(
                f"llama.cpp could not load the model {path}" + (f": {why}" if why else "")
            )
        self.ptr: Any = ptr
        self.vocab: Any = C.llama_model_get_vocab(ptr)
        self.n_vocab = int(C.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(C.llama_model_n_embd(ptr))
        self.n_embd_inp = int(C.llama_model_n_embd_inp(ptr))
        """Width of input embedding rows (differs from ``n_embd`` for deepstack models)."""
        rope = int(C.llama_model_rope_type(ptr))
        mrope = rope in (C.LLAMA_ROPE_TYPE_MROPE, C.LLAMA_ROPE_TYPE_IMROPE)
        self.n_pos_per_embd = 4 if mrope else 1
        """Positions per embedding row: 4 for M-RoPE models (Qwen2-VL …), else 1."""
        self.n_ctx_train = int(C.llama_model_n_ctx_train(ptr))
        self.bos = int(C.llama_vocab_bos(self.vocab))
        self.eos = int(C.llama_vocab_eos(self.vocab))
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.vocab))
        self.has_encoder = bool(C.llama_model_has_encoder(ptr))
        self.decoder_start = int(C.llama_model_decoder_start_token(ptr))
        self._piece_cache: dict[int, bytes] = {}

    @property
    def address(self) -> int:
        """The ``llama_model*`` as an integer (what mtmd needs)."""
        if isinstance(self.ptr, int):
            return self.ptr
        value = ctypes.cast(self.ptr, ctypes.c_void_p).value
        return int(value or 0)

    def close(self) -> None:
        if self.ptr:
            C.llama_model_free(self.ptr)
            self.ptr = None
            self.vocab = None

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = C.llama_model_meta_val_str(self.ptr, key.encode("utf-8"), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            C.llama_model_meta_val_str(self.ptr, key.encode("utf-8"), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        raw = C.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def desc(self) -> str:
        buf = ctypes.create_string_buffer(256)
        C.llama_model_desc(self.ptr, buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    # -- vocabulary --

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
            if n < 0:
                raise RuntimeError(f"llama_tokenize failed ({n})")
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes one token stands for (``special``: render control tokens too)."""
        key = token if not special else -token - 1
        cached = self._piece_cache.get(key)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        out = buf.raw[: max(n, 0)]
        self._piece_cache[key] = out
        return out

    def token_text(self, token: int) -> str:
        raw = C.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return b"".join(self.piece(t, special=special) for t in tokens).decode(
            "utf-8", errors="replace"
        )

    def special_tokens(self) -> dict[str, int]:
        """Text → id of every token llama.cpp's ``parse_special`` recognises in text."""
        mask = C.LLAMA_TOKEN_ATTR_CONTROL | C.LLAMA_TOKEN_ATTR_USER_DEFINED
        mask |= C.LLAMA_TOKEN_ATTR_UNKNOWN
        out: dict[str, int] = {}
        for i in range(self.n_vocab):
            if int(C.llama_vocab_get_attr(self.vocab, i)) & mask:
                text = self.token_text(i)
                if text and text not in out:
                    out[text] = i
        return out

    def fim_tokens(self) -> tuple[int, int, int]:
        """(prefix, suffix, middle) fill-in-the-middle token ids; -1 where missing."""
        v = self.vocab
        return (
            int(C.llama_vocab_fim_pre(v)),
            int(C.llama_vocab_fim_suf(v)),
            int(C.llama_vocab_fim_mid(v)),
        )

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.vocab, token))


# --- context ----------------------------------------------------------------------------


class _Batch:
    """A ``llama_batch`` over numpy arrays that this object keeps alive.

    ``pos``: the first position (consecutive positions follow), or the positions themselves:
    one per token, or for embeddings ``n * n_pos_per_embd`` section-major (M-RoPE).
    ``seq_id``: one sequence for every entry, or one per entry. ``logits``: compute logits
    for the last entry only (``logits_last``), or for the entries a boolean mask selects.
    """

    def __init__(
        self,
        pos: int | np.ndarray,
        *,
        tokens: np.ndarray | None = None,
        embd: np.ndarray | None = None,
        logits_last: bool = False,
        seq_id: int | np.ndarray = 0,
        logits: np.ndarray | None = None,
    ) -> None:
        if (tokens is None) == (embd is None):
            raise ValueError("a batch holds either tokens or embeddings")
        if tokens is not None:
            self.tokens: np.ndarray | None = np.ascontiguousarray(tokens, dtype=np.int32)
            n = int(self.tokens.shape[0])
            self.embd: np.ndarray | None = None
        else:
            assert embd is not None
            self.embd = np.ascontiguousarray(embd, dtype=np.float32)
            n = int(self.embd.shape[0])
            self.tokens = None
        self.n = n
        if isinstance(pos, np.ndarray):
            self.pos = np.ascontiguousarray(pos, dtype=np.int32).reshape(-1)
            if self.pos.shape[0] < n or self.pos.shape[0] % max(n, 1):
                raise ValueError(f"{self.pos.shape[0]} positions for {n} batch entries")
        else:
            self.pos = np.arange(pos, pos + n, dtype=np.int32)
        self.n_seq_id = np.ones(n, dtype=np.int32)
        if isinstance(seq_id, np.ndarray):
            self.seq_ids = np.ascontiguousarray(seq_id, dtype=np.int32).reshape(-1)
            if self.seq_ids.shape[0] != n:
                raise ValueError(f"{self.seq_ids.shape[0]} sequence ids for {n} batch entries")
            self.seq_ptrs = self.seq_ids.ctypes.data + 4 * np.arange(n, dtype=np.uintp)
        else:
            self.seq_ids = np.full(1, seq_id, dtype=np.int32)
            self.seq_ptrs = np.full(n, self.seq_ids.ctypes.data, dtype=np.uintp)
        if logits is not None:
            self.logits = np.ascontiguousarray(logits, dtype=np.int8).reshape(-1)
        else:
            self.logits = np.zeros(n, dtype=np.int8)
            if logits_last and n:
                self.logits[-1] = 1
        b: Any = C.llama_batch()
        b.n_tokens = n
        i32p = ctypes.POINTER(ctypes.c_int32)
        if self.tokens is not None:
            b.token = self.tokens.ctypes.data_as(i32p)
        else:
            assert self.embd is not None
            b.embd = self.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        b.pos = self.pos.ctypes.data_as(i32p)
        b.n_seq_id = self.n_seq_id.ctypes.data_as(i32p)
        b.seq_id = ctypes.cast(self.seq_ptrs.ctypes.data, ctypes.POINTER(i32p))
        b.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.struct = b


class Context:
    """A ``llama_context`` (libllama): the ``mmchat.runtime.backend.TextBackend`` of GGUF
    text models. ``n_seq_max`` sequences share its ``n_ctx`` cells."""

    def __init__(
        self,
        model: TextModel,
        *,
        n_ctx: int,
        n_batch: int,
        n_threads: int | None,
        flash_attn: bool | None,
        kv_cache_type: str,
        n_seq_max: int = 1,
    ) -> None:
        self.model = model
        params = C.llama_context_default_params()
        params.n_ctx = int(n_ctx)
        params.n_batch = int(n_batch)
        params.n_ubatch = int(n_batch)
        params.n_seq_max = int(n_seq_max)
        params.kv_unified = n_seq_max > 1
        # llama.cpp's own default is a fixed 4 threads: on a 2-CPU machine that
        # oversubscribes the cores and a reply takes 20x longer. Use what we may run on.
        threads = int(n_threads or usable_cpus())
        params.n_threads = threads
        params.n_threads_batch = threads
        if flash_attn is None:
            params.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_AUTO
        elif flash_attn:
            params.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED
        else:
            params.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
        kv_type = GGML_TYPES.get(kv_cache_type)
        if kv_type is None:
            raise UserError(f"this llama.cpp build has no KV cache type {kv_cache_type!r}")
        params.type_k = kv_type
        params.type_v = kv_type
        params.no_perf = False
        clear_recent_errors()
        ptr = C.llama_init_from_model(model.ptr, params)
        if not ptr:
            why = recent_errors()
            raise UserError(
                f"llama.cpp could not create a context of {n_ctx} tokens"
                + (f": {why}" if why else "")
            )
        self.ptr: Any = ptr
        self.mem: Any = C.llama_get_memory(ptr)
        self.n_ctx = int(C.llama_n_ctx(ptr))
        self.n_ctx_seq = self.n_ctx // max(1, int(n_seq_max))
        """Cells one sequence may use (the context is shared by ``n_seq_max``)."""
        self.n_embd_image = 0
        """Width of image rows decoded besides input embeddings: none for libllama."""
        self.n_batch = int(C.llama_n_batch(ptr))
        self.n_ubatch = int(C.llama_n_ubatch(ptr))
        self.n_threads = int(C.llama_n_threads(ptr))
        # one reusable single-token batch for generation (no allocation per token)
        self._one = _Batch(0, tokens=np.zeros(1, dtype=np.int32), logits_last=True)

    def close(self) -> None:
        if self.ptr:
            C.llama_free(self.ptr)
            self.ptr = None
            self.mem = None

    @property
    def n_pos_per_embd(self) -> int:
        return self.model.n_pos_per_embd

    # -- memory (KV cache) --

    def pos_max(self, seq_id: int = 0) -> int:
        """Largest position held for the sequence, -1 when empty."""
        return int(C.llama_memory_seq_pos_max(self.mem, seq_id))

    def truncate(self, n_keep: int, seq_id: int = 0) -> bool:
        """Drop every position >= n_keep of the sequence. False when the memory cannot do a
        partial removal."""
        if n_keep <= 0 and int(C.llama_n_seq_max(self.ptr)) == 1:
            C.llama_memory_clear(self.mem, True)
            return True
        return bool(C.llama_memory_seq_rm(self.mem, seq_id, max(n_keep, 0), -1))

    def clear(self) -> None:
        C.llama_memory_clear(self.mem, True)

    # -- decoding --

    def _decode(self, batch: _Batch) -> None:
        rc = int(C.llama_decode(self.ptr, batch.struct))
        if rc != 0:
            if rc == 1:
                raise DecodeError(rc, "the context is full (no room left in the KV cache)")
            if rc == 2:
                raise DecodeError(rc, "decoding was aborted")
            why = recent_errors()
            raise DecodeError(rc, f"llama_decode failed ({rc})" + (f": {why}" if why else ""))

    def decode_tokens(
        self, tokens: np.ndarray, pos: int | np.ndarray, *, logits_last: bool, seq_id: int = 0
    ) -> None:
        self._decode(_Batch(pos, tokens=tokens, logits_last=logits_last, seq_id=seq_id))

    def decode_mixed(
        self, tokens: np.ndarray, pos: np.ndarray, seq_ids: np.ndarray, logits: np.ndarray
    ) -> None:
        """One batch of tokens of several sequences (parallel serving): each entry has its
        own position and sequence; ``logits`` marks the entries whose logits are kept (read
        them with ``logits_at(i)`` / sample with ``SamplerChain.sample(ctx, i)``)."""
        self._decode(_Batch(pos, tokens=tokens, seq_id=seq_ids, logits=logits))

    def logits_at(self, i: int) -> np.ndarray:
        """Logits of batch entry ``i`` of the last decode (a copy)."""
        ptr = C.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise RuntimeError(f"no logits were computed for batch entry {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def decode_one(self, token: int, pos: int, seq_id: int = 0) -> None:
        """Decode one token at ``pos`` with logits (the generation step)."""
        one = self._one
        assert one.tokens is not None
        one.tokens[0] = token
        one.pos[0] = pos
        one.seq_ids[0] = seq_id
        self._decode(one)

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
        n = int(embd.shape[0])
        nppe = self.model.n_pos_per_embd
        if isinstance(pos, np.ndarray):
            if pos.size != n * nppe:
                raise ValueError(f"{pos.size} positions for {n} rows x {nppe} sections")
        elif nppe > 1:  # consecutive positions in every M-RoPE section
            pos = np.tile(np.arange(pos, pos + n, dtype=np.int32), nppe)
        if non_causal:
            C.llama_set_causal_attn(self.ptr, False)
        try:
            self._decode(_Batch(pos, embd=embd, logits_last=logits_last, seq_id=seq_id))
        finally:
            if non_causal:
                C.llama_set_causal_attn(self.ptr, True)

    def encode_embeddings(self, embd: np.ndarray) -> None:
        """Run the encoder of an encoder-decoder model (T5) on ``(n, n_embd)`` input rows as
        one micro-batch (positions 0..n-1, sequence 0); the decoder then attends to its
        output. ``n`` must not exceed ``n_ubatch``."""
        n = int(embd.shape[0]) if embd.ndim == 2 else 0
        if not n or embd.shape[1] != self.model.n_embd_inp:
            raise ValueError(f"encoder input of shape {embd.shape}")
        if n > self.n_ubatch:
            raise UserError(
                f"the encoder input has {n} rows but the batch holds {self.n_ubatch}: the "
                "encoder takes the whole prompt at once (load with a larger context)"
            )
        clear_recent_errors()
        batch = _Batch(0, embd=embd)
        rc = int(C.llama_encode(self.ptr, batch.struct))
        if rc != 0:
            why = recent_errors()
            raise DecodeError(rc, f"llama_encode failed ({rc})" + (f": {why}" if why else ""))

    def last_logits(self) -> np.ndarray:
        ptr = C.llama_get_logits_ith(self.ptr, -1)
        if not ptr:
            raise RuntimeError("no logits were computed for the last position")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def perf(self) -> dict[str, float]:
        d = C.llama_perf_context(self.ptr)
        return {
            "load_ms": float(d.t_load_ms),
            "prompt_eval_ms": float(d.t_p_eval_ms),
            "eval_ms": float(d.t_eval_ms),
            "n_prompt_eval": float(d.n_p_eval),
            "n_eval": float(d.n_eval),
        }
