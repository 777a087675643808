"""ctypes binding of libmmvision's model API: load a vision GGUF, encode preprocessed images
(and, for families that read text such as InstructBLIP, the token ids of an instruction)."""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# mmv_status codes (native/include/mmvision.h)
MMV_OK = 0
STATUS_NAMES = {
    0: "ok",
    1: "invalid argument",
    2: "i/o error",
    3: "format error",
    4: "unsupported",
    5: "backend error",
    6: "out of memory",
    7: "internal error",
}
MMV_ERR_INVALID_ARGUMENT = 1
MMV_ERR_IO = 2
MMV_ERR_FORMAT = 3
MMV_ERR_UNSUPPORTED = 4
MMV_ERR_BACKEND = 5
MMV_ERR_OUT_OF_MEMORY = 6

MMV_FLAG_FAST_MATH = 1
MMV_FLAG_NO_FLASH_ATTN = 2


class ModelParams(ctypes.Structure):
    _fields_ = [
        ("device", ctypes.c_char_p),
        ("n_threads", ctypes.c_int32),
        ("expected_n_embd", ctypes.c_int32),
        ("max_batch", ctypes.c_int32),
        ("flags", ctypes.c_int32),
    ]


class _ModelInfoStruct(ctypes.Structure):
    _fields_ = [
        ("projector_type", ctypes.c_char * 32),
        ("device", ctypes.c_char * 128),
        ("image_size", ctypes.c_int32),
        ("patch_size", ctypes.c_int32),
        ("n_tokens", ctypes.c_int32),
        ("n_embd", ctypes.c_int32),
        ("n_embd_vision", ctypes.c_int32),
        ("n_layer_file", ctypes.c_int32),
        ("n_layer_run", ctypes.c_int32),
        ("legacy_layout", ctypes.c_int32),
        ("ffn_swapped", ctypes.c_int32),
        ("use_gelu", ctypes.c_int32),
        ("image_mean", ctypes.c_float * 3),
        ("image_std", ctypes.c_float * 3),
        ("eps", ctypes.c_float),
        ("flash_attn", ctypes.c_int32),
        ("text_input", ctypes.c_int32),
        ("n_text_max", ctypes.c_int32),
        ("n_text_vocab", ctypes.c_int32),
    ]


def declare_model_functions(lib: ctypes.CDLL) -> None:
    """Give the model entry points their C signatures (AttributeError if one is missing)."""
    handle = ctypes.c_void_p
    lib.mmv_model_default_params.restype = ModelParams
    lib.mmv_model_default_params.argtypes = []
    lib.mmv_model_load.restype = ctypes.c_int
    lib.mmv_model_load.argtypes = [
        ctypes.c_char_p,
        ctypes.POINTER(ModelParams),
        ctypes.POINTER(handle),
    ]
    lib.mmv_model_free.restype = None
    lib.mmv_model_free.argtypes = [handle]
    lib.mmv_model_get_info.restype = ctypes.c_int
    lib.mmv_model_get_info.argtypes = [handle, ctypes.POINTER(_ModelInfoStruct)]
    lib.mmv_model_set_n_threads.restype = ctypes.c_int
    lib.mmv_model_set_n_threads.argtypes = [handle, ctypes.c_int32]
    lib.mmv_encode.restype = ctypes.c_int
    lib.mmv_encode.argtypes = [
        handle,
        ctypes.POINTER(ctypes.c_float),
        ctypes.c_int32,
        ctypes.POINTER(ctypes.c_float),
        ctypes.c_size_t,
    ]
    lib.mmv_encode_text.restype = ctypes.c_int
    lib.mmv_encode_text.argtypes = [
        handle,
        ctypes.POINTER(ctypes.c_float),
        ctypes.c_int32,
        ctypes.POINTER(ctypes.c_int32),
        ctypes.c_int32,
        ctypes.POINTER(ctypes.c_float),
        ctypes.c_size_t,
    ]


class NativeError(RuntimeError):
    """A libmmvision call failed; ``status`` is the mmv_status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def status_name(self) -> str:
        return STATUS_NAMES.get(self.status, f"status {self.status}")


@dataclass(frozen=True)
class ModelInfo:
    projector_type: str
    device: str
    image_size: int
    patch_size: int
    n_tokens: int
    n_embd: int
    n_embd_vision: int
    n_layer_file: int
    n_layer_run: int
    legacy_layout: bool
    ffn_swapped: bool
    use_gelu: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    eps: float
    flash_attn: bool
    text_input: bool = False
    """The rows depend on token ids (InstructBLIP's instruction): pass ``tokens`` to encode."""
    n_text_max: int = 0
    n_text_vocab: int = 0


class NativeVisionModel:
    """An mmproj loaded by libmmvision (weights on the chosen ggml device)."""

    def __init__(
        self,
        library: Any,
        path: str | Path,
        *,
        device: str | None = None,
        n_threads: int | None = None,
        expected_n_embd: int | None = None,
        max_batch: int = 1,
        fast_math: bool = False,
        flash_attn: bool = True,
    ) -> None:
        self._library = library  # keep the CDLL alive as long as the model
        self._lib = library.lib
        self._lock = threading.Lock()
        params = self._lib.mmv_model_default_params()
        params.device = device.encode() if device else None
        params.n_threads = int(n_threads or 0)
        params.expected_n_embd = int(expected_n_embd or 0)
        params.max_batch = max(1, int(max_batch))
        params.flags = (MMV_FLAG_FAST_MATH if fast_math else 0) | (
            0 if flash_attn else MMV_FLAG_NO_FLASH_ATTN
        )
        handle = ctypes.c_void_p()
        status = self._lib.mmv_model_load(
            str(path).encode(), ctypes.byref(params), ctypes.byref(handle)
        )
        if status != MMV_OK:
            raise NativeError(status, library.last_error())
        self._handle: ctypes.c_void_p | None = handle
        info = _ModelInfoStruct()
        self._check(self._lib.mmv_model_get_info(handle, ctypes.byref(info)))
        self.info = ModelInfo(
            projector_type=info.projector_type.decode(),
            device=info.device.decode(errors="replace"),
            image_size=info.image_size,
            patch_size=info.patch_size,
            n_tokens=info.n_tokens,
            n_embd=info.n_embd,
            n_embd_vision=info.n_embd_vision,
            n_layer_file=info.n_layer_file,
            n_layer_run=info.n_layer_run,
            legacy_layout=bool(info.legacy_layout),
            ffn_swapped=bool(info.ffn_swapped),
            use_gelu=bool(info.use_gelu),
            image_mean=(info.image_mean[0], info.image_mean[1], info.image_mean[2]),
            image_std=(info.image_std[0], info.image_std[1], info.image_std[2]),
            eps=info.eps,
            flash_attn=bool(info.flash_attn),
            text_input=bool(info.text_input),
            n_text_max=int(info.n_text_max),
            n_text_vocab=int(info.n_text_vocab),
        )

    def _check(self, status: int) -> None:
        if status != MMV_OK:
            raise NativeError(status, self._library.last_error())

    def _live_handle(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise NativeError(MMV_ERR_INVALID_ARGUMENT, "the vision model was closed")
        return self._handle

    def set_n_threads(self, n_threads: int) -> None:
        with self._lock:
            self._check(self._lib.mmv_model_set_n_threads(self._live_handle(), int(n_threads)))

    def encode(self, pixels: np.ndarray, tokens: Sequence[int] | None = None) -> np.ndarray:
        """``pixels`` [n, 3, S, S] (or [3, S, S]) float32 -> embeddings [n, n_tokens, n_embd].

        ``tokens``: the token ids every image of the call is encoded with (only for models
        with ``info.text_input``, e.g. InstructBLIP's instruction)."""
        s = self.info.image_size
        arr = np.ascontiguousarray(pixels, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[1:] != (3, s, s):
            raise ValueError(f"pixels must have shape [n, 3, {s}, {s}], got {list(pixels.shape)}")
        n = arr.shape[0]
        out = np.empty((n, self.info.n_tokens, self.info.n_embd), dtype=np.float32)
        px = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        dst = out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        with self._lock:
            handle = self._live_handle()
            if tokens is None:
                self._check(self._lib.mmv_encode(handle, px, n, dst, out.size))
            else:
                ids = np.ascontiguousarray(np.asarray(tokens, dtype=np.int32).reshape(-1))
                self._check(
                    self._lib.mmv_encode_text(
                        handle,
                        px,
                        n,
                        ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                        int(ids.size),
                        dst,
                        out.size,
                    )
                )
        return out

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._lib.mmv_model_free(self._handle)
                self._handle = None

    def __enter__(self) -> NativeVisionModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
