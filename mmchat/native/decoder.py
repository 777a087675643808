"""ctypes binding of libmmvision's cross-attention decoder (native/include/mmdecoder.h): the
IDEFICS text model with its KV cache, per-image cross-attention keys/values and logits.

The decoder has its own ABI version (``mmd_abi_version``), checked here, so a library built
before it existed is reported as such instead of failing on a missing symbol later.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmchat.native.library import NativeLibrary, NativeUnavailableError, load_library
from mmchat.native.model import MMV_ERR_INVALID_ARGUMENT, MMV_OK, NativeError

MMD_ABI_VERSION = 2


class _ModelParams(ctypes.Structure):
    _fields_ = [("device", ctypes.c_char_p), ("n_threads", ctypes.c_int32)]


class _ModelInfo(ctypes.Structure):
    _fields_ = [
        ("architecture", ctypes.c_char * 32),
        ("device", ctypes.c_char * 128),
        ("n_vocab", ctypes.c_int32),
        ("n_embd", ctypes.c_int32),
        ("n_layer", ctypes.c_int32),
        ("n_head", ctypes.c_int32),
        ("n_head_kv", ctypes.c_int32),
        ("n_ff", ctypes.c_int32),
        ("n_ctx_train", ctypes.c_int32),
        ("n_cross", ctypes.c_int32),
        ("n_embd_image", ctypes.c_int32),
    ]


class _ContextParams(ctypes.Structure):
    _fields_ = [
        ("n_ctx", ctypes.c_int32),
        ("n_seq", ctypes.c_int32),
        ("n_batch", ctypes.c_int32),
        ("n_image_slots", ctypes.c_int32),
        ("n_image_rows", ctypes.c_int32),
        ("eos_token", ctypes.c_int32),
        ("kv_f16", ctypes.c_int32),
    ]


_I32P = ctypes.POINTER(ctypes.c_int32)
_I8P = ctypes.POINTER(ctypes.c_int8)
_F32P = ctypes.POINTER(ctypes.c_float)
_declared: set[int] = set()
_declare_lock = threading.Lock()


def _declare(lib: ctypes.CDLL) -> None:
    h = ctypes.c_void_p
    lib.mmd_abi_version.restype = ctypes.c_int32
    lib.mmd_abi_version.argtypes = []
    lib.mmd_model_default_params.restype = _ModelParams
    lib.mmd_context_default_params.restype = _ContextParams
    lib.mmd_model_load.restype = ctypes.c_int
    lib.mmd_model_load.argtypes = [ctypes.c_char_p, ctypes.POINTER(_ModelParams), ctypes.POINTER(h)]
    lib.mmd_model_free.restype = None
    lib.mmd_model_free.argtypes = [h]
    lib.mmd_model_get_info.restype = ctypes.c_int
    lib.mmd_model_get_info.argtypes = [h, ctypes.POINTER(_ModelInfo)]
    lib.mmd_context_new.restype = ctypes.c_int
    lib.mmd_context_new.argtypes = [h, ctypes.POINTER(_ContextParams), ctypes.POINTER(h)]
    lib.mmd_context_free.restype = None
    lib.mmd_context_free.argtypes = [h]
    lib.mmd_set_n_threads.restype = ctypes.c_int
    lib.mmd_set_n_threads.argtypes = [h, ctypes.c_int32]
    lib.mmd_add_image.restype = ctypes.c_int
    lib.mmd_add_image.argtypes = [h, ctypes.c_int32, ctypes.c_int32, _F32P, ctypes.c_int32]
    lib.mmd_decode.restype = ctypes.c_int
    lib.mmd_decode.argtypes = [
        h,
        ctypes.c_int32,
        ctypes.c_int32,
        _I32P,
        _F32P,
        _I32P,
        ctypes.c_int32,
    ]
    lib.mmd_decode_batch.restype = ctypes.c_int
    lib.mmd_decode_batch.argtypes = [h, ctypes.c_int32, _I32P, _I32P, _I32P, _I8P]
    lib.mmd_get_logits.restype = _F32P
    lib.mmd_get_logits.argtypes = [h]
    lib.mmd_get_logits_ith.restype = _F32P
    lib.mmd_get_logits_ith.argtypes = [h, ctypes.c_int32]
    lib.mmd_pos_max.restype = ctypes.c_int32
    lib.mmd_pos_max.argtypes = [h, ctypes.c_int32]
    lib.mmd_truncate.restype = ctypes.c_int
    lib.mmd_truncate.argtypes = [h, ctypes.c_int32, ctypes.c_int32]
    lib.mmd_clear.restype = None
    lib.mmd_clear.argtypes = [h]
    lib.mmd_n_images.restype = ctypes.c_int32
    lib.mmd_n_images.argtypes = [h, ctypes.c_int32]


def decoder_library() -> NativeLibrary:
    """The native library with the decoder entry points typed, or NativeUnavailableError."""
    library = load_library()
    with _declare_lock:
        if id(library) not in _declared:
            try:
                _declare(library.lib)
            except AttributeError as exc:
                raise NativeUnavailableError(
                    f"{library.path} has no cross-attention decoder (built before IDEFICS "
                    "support); reinstall mmchat"
                ) from exc
            abi = int(library.lib.mmd_abi_version())
            if abi != MMD_ABI_VERSION:
                raise NativeUnavailableError(
                    f"{library.path} has decoder ABI version {abi}, this mmchat needs "
                    f"{MMD_ABI_VERSION}; reinstall mmchat"
                )
            _declared.add(id(library))
    return library


@dataclass(frozen=True)
class DecoderInfo:
    architecture: str
    device: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    n_cross: int
    n_embd_image: int


class DecoderModel:
    """The weights of a cross-attention decoder (one text GGUF)."""

    def __init__(self, path: str | Path, *, device: str | None = None, n_threads: int = 0) -> None:
        self._library = decoder_library()
        lib = self._library.lib
        params = lib.mmd_model_default_params()
        params.device = device.encode() if device else None
        params.n_threads = int(n_threads)
        handle = ctypes.c_void_p()
        status = lib.mmd_model_load(str(path).encode(), ctypes.byref(params), ctypes.byref(handle))
        if status != MMV_OK:
            raise NativeError(status, self._library.last_error())
        self._handle: ctypes.c_void_p | None = handle
        info = _ModelInfo()
        self._check(lib.mmd_model_get_info(handle, ctypes.byref(info)))
        self.info = DecoderInfo(
            architecture=info.architecture.decode(),
            device=info.device.decode(errors="replace"),
            **{str(f[0]): int(getattr(info, str(f[0]))) for f in _ModelInfo._fields_[2:]},
        )

    @property
    def library(self) -> NativeLibrary:
        return self._library

    def _check(self, status: int) -> None:
        if status != MMV_OK:
            raise NativeError(status, self._library.last_error())

    def handle(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise NativeError(MMV_ERR_INVALID_ARGUMENT, "the decoder model was closed")
        return self._handle

    def close(self) -> None:
        if self._handle is not None:
            self._library.lib.mmd_model_free(self._handle)
            self._handle = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


class DecoderContext:
    """KV cache, image slots and logits over a :class:`DecoderModel` (not thread-safe: the
    runtime serialises calls per context)."""

    def __init__(
        self,
        model: DecoderModel,
        *,
        n_ctx: int,
        n_seq: int = 1,
        n_batch: int = 512,
        n_image_slots: int = 16,
        n_image_rows: int = 64,
        eos_token: int = -1,
        kv_f16: bool = False,
    ) -> None:
        self.model = model
        lib = model.library.lib
        p = lib.mmd_context_default_params()
        p.n_ctx, p.n_seq, p.n_batch = int(n_ctx), int(n_seq), int(n_batch)
        p.n_image_slots, p.n_image_rows = int(n_image_slots), int(n_image_rows)
        p.eos_token, p.kv_f16 = int(eos_token), int(bool(kv_f16))
        handle = ctypes.c_void_p()
        model._check(lib.mmd_context_new(model.handle(), ctypes.byref(p), ctypes.byref(handle)))
        self._handle: ctypes.c_void_p | None = handle
        self.n_ctx = int(n_ctx)
        self.n_seq = int(n_seq)
        self.n_batch = min(int(n_batch), int(n_ctx))
        self.n_image_rows = int(n_image_rows)

    def _h(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise NativeError(MMV_ERR_INVALID_ARGUMENT, "the decoder context was closed")
        return self._handle

    def set_n_threads(self, n_threads: int) -> None:
        self.model._check(self.model.library.lib.mmd_set_n_threads(self._h(), int(n_threads)))

    def add_image(self, rows: np.ndarray, pos: int, seq: int = 0) -> None:
        """Register an image whose ``<image>`` token is at ``pos`` (rows: n x n_embd_image)."""
        arr = np.ascontiguousarray(rows, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.model.info.n_embd_image:
            raise NativeError(
                MMV_ERR_INVALID_ARGUMENT,
                f"image rows of shape {arr.shape}; the decoder reads rows of width "
                f"{self.model.info.n_embd_image}",
            )
        self.model._check(
            self.model.library.lib.mmd_add_image(
                self._h(), int(seq), int(pos), arr.ctypes.data_as(_F32P), int(arr.shape[0])
            )
        )

    def decode(
        self,
        pos: Sequence[int] | np.ndarray,
        *,
        tokens: Sequence[int] | np.ndarray | None = None,
        embd: np.ndarray | None = None,
        logits_last: bool = True,
        seq: int = 0,
    ) -> None:
        """One call of at most ``n_batch`` tokens (or embedding rows) at ``pos``."""
        p = np.ascontiguousarray(pos, dtype=np.int32)
        tok = None if tokens is None else np.ascontiguousarray(tokens, dtype=np.int32)
        emb = None if embd is None else np.ascontiguousarray(embd, dtype=np.float32)
        n = len(p)
        if (tok is None) == (emb is None) or len(tok if tok is not None else emb) != n:  # type: ignore[arg-type]
            raise NativeError(MMV_ERR_INVALID_ARGUMENT, "give tokens or embd, one per position")
        self.model._check(
            self.model.library.lib.mmd_decode(
                self._h(),
                int(seq),
                n,
                None if tok is None else tok.ctypes.data_as(_I32P),
                None if emb is None else emb.ctypes.data_as(_F32P),
                p.ctypes.data_as(_I32P),
                int(logits_last),
            )
        )

    def decode_batch(
        self,
        tokens: Sequence[int] | np.ndarray,
        pos: Sequence[int] | np.ndarray,
        seq_ids: Sequence[int] | np.ndarray,
        logits: Sequence[int] | np.ndarray,
    ) -> None:
        """One graph for at most ``n_batch`` tokens of several sequences: token ``i`` at
        ``pos[i]`` of sequence ``seq_ids[i]``; the logits of the tokens ``logits`` flags are
        kept (:meth:`logits_ith`)."""
        tok = np.ascontiguousarray(tokens, dtype=np.int32)
        p = np.ascontiguousarray(pos, dtype=np.int32)
        s = np.ascontiguousarray(seq_ids, dtype=np.int32)
        want = np.ascontiguousarray(logits, dtype=np.int8)
        n = len(tok)
        if not (len(p) == len(s) == len(want) == n):
            raise NativeError(
                MMV_ERR_INVALID_ARGUMENT, "one position, sequence and logits flag per token"
            )
        self.model._check(
            self.model.library.lib.mmd_decode_batch(
                self._h(),
                n,
                tok.ctypes.data_as(_I32P),
                p.ctypes.data_as(_I32P),
                s.ctypes.data_as(_I32P),
                want.ctypes.data_as(_I8P),
            )
        )

    def logits(self) -> np.ndarray:
        """The logits of the last decode's last entry with logits (a copy)."""
        ptr = self.model.library.lib.mmd_get_logits(self._h())
        if not ptr:
            raise NativeError(MMV_ERR_INVALID_ARGUMENT, "no logits: the last decode computed none")
        return np.ctypeslib.as_array(ptr, shape=(self.model.info.n_vocab,)).copy()

    def logits_ith(self, i: int) -> np.ndarray:
        """The logits of token ``i`` of the last decode (a copy)."""
        ptr = self.model.library.lib.mmd_get_logits_ith(self._h(), int(i))
        if not ptr:
            raise NativeError(
                MMV_ERR_INVALID_ARGUMENT, f"no logits were computed for batch entry {i}"
            )
        return np.ctypeslib.as_array(ptr, shape=(self.model.info.n_vocab,)).copy()

    def pos_max(self, seq: int = 0) -> int:
        return int(self.model.library.lib.mmd_pos_max(self._h(), int(seq)))

    def n_images(self, seq: int = 0) -> int:
        return int(self.model.library.lib.mmd_n_images(self._h(), int(seq)))

    def truncate(self, n_keep: int, seq: int = 0) -> None:
        self.model._check(self.model.library.lib.mmd_truncate(self._h(), int(seq), int(n_keep)))

    def clear(self) -> None:
        self.model.library.lib.mmd_clear(self._h())

    def close(self) -> None:
        if self._handle is not None:
            self.model.library.lib.mmd_context_free(self._handle)
            self._handle = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()
