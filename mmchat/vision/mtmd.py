"""Non-LLaVA projectors on llama.cpp's mtmd (through llama-cpp-python's ``mtmd_cpp``).

mtmd does its own preprocessing (from the RGB pixels of the ``PreparedImage``) and may wrap
the image in text tokens (e.g. Gemma 3's ``<start_of_image>``); those come back as
``prefix_tokens``/``suffix_tokens`` so the runtime can feed them around the embeddings.
"""

from __future__ import annotations

import ctypes
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmchat.errors import CorruptFileError, UserError
from mmchat.vision.cache import EmbeddingCache
from mmchat.vision.engine import ImageEmbedding, VisionEngine
from mmchat.vision.image import PreparedImage

_GGML_LOG_LEVEL_WARN = 3
_GGML_LOG_LEVEL_ERROR = 4
_GGML_LOG_LEVEL_CONT = 5
_log_callback: Any = None
_recent: deque[str] = deque(maxlen=20)
_last_level = 0


def _quiet_mtmd_logs(mtmd: Any) -> None:
    """Keep mtmd/clip's chatty load-time log off stderr; remember warnings and errors so a
    failure can say why (``_last_error``)."""
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _cb(level: int, text: bytes, user_data: Any) -> None:
        global _last_level
        if level != _GGML_LOG_LEVEL_CONT:
            _last_level = level
        if _last_level >= _GGML_LOG_LEVEL_WARN and text:
            line = text.decode(errors="replace").strip()
            if line:
                _recent.append(line)

    _log_callback = _cb
    mtmd.mtmd_log_set(_cb, None)
    mtmd.mtmd_helper_log_set(_cb, None)


def _last_error() -> str:
    """The most telling recent clip/mtmd log line ("Key not found: ...")."""
    for line in reversed(_recent):
        if "failed to load" in line and "': " in line:
            return line.split("': ", 1)[1]
    return _recent[-1] if _recent else ""


class MtmdEngine(VisionEngine):
    """Any mmproj llama.cpp's mtmd supports; embeddings via ``mtmd_encode_chunk``."""

    kind = "mtmd"

    def __init__(
        self,
        mmproj: Path,
        *,
        llama_model: int,
        text_n_embd: int,
        projector_type: str,
        n_threads: int | None = None,
        use_gpu: bool = True,
        cache: EmbeddingCache | None = None,
        disk_cache: bool | Path = False,
        quiet: bool = True,
    ) -> None:
        import os

        from llama_cpp import mtmd_cpp as mtmd

        super().__init__(mmproj, cache=cache, disk_cache=disk_cache)
        self._mtmd = mtmd
        if quiet:
            _quiet_mtmd_logs(mtmd)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = bool(use_gpu)
        params.print_timings = False
        params.warmup = False
        params.n_threads = int(n_threads or os.cpu_count() or 1)
        _recent.clear()
        self._ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llama_model, params)
        if not self._ctx:
            why = _last_error()
            raise CorruptFileError(
                f"llama.cpp (mtmd) cannot load projector {mmproj}"
                + (f": {why}" if why else " (wrong projector for this model, or unsupported)")
            )
        if not mtmd.mtmd_support_vision(self._ctx):
            self._close()
            raise UserError(f"{mmproj} has no vision encoder (audio-only projector?)")
        self.projector_type = projector_type
        self.n_embd = int(text_n_embd)
        self.image_size = 0  # mtmd picks the size per image
        self.use_mrope = bool(mtmd.mtmd_decode_use_mrope(self._ctx))
        self._n_tokens: dict[str, int] = {}

    # one image -> its input chunks ------------------------------------------------------
    def _tokenize(self, image: PreparedImage) -> Any:
        mtmd = self._mtmd
        if not self._ctx:
            raise UserError("the vision engine was closed")
        rgb = image.image.tobytes()
        buf = (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb)
        bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, buf)
        if not bitmap:
            raise UserError(f"mtmd cannot take image {image.source}")
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            mtmd.mtmd_bitmap_set_id(bitmap, image.digest.encode())
            marker = mtmd.mtmd_default_marker()
            text = mtmd.mtmd_input_text()
            text.text = marker
            text.text_len = len(marker)
            text.add_special = False
            text.parse_special = True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise UserError(f"mtmd could not preprocess image {image.source} (code {rc})")
        except BaseException:
            mtmd.mtmd_input_chunks_free(chunks)
            raise
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        return chunks

    def tokens_for(self, image: PreparedImage) -> int:
        n = self._n_tokens.get(image.digest)
        if n is None:
            mtmd = self._mtmd
            with self._lock:
                chunks = self._tokenize(image)
                try:
                    n = 0
                    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                        if (
                            mtmd.mtmd_input_chunk_get_type(chunk)
                            == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE
                        ):
                            n += int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
                finally:
                    mtmd.mtmd_input_chunks_free(chunks)
            self._n_tokens[image.digest] = n
        return n

    def _encode_one(self, image: PreparedImage) -> ImageEmbedding:
        mtmd = self._mtmd
        t0 = time.perf_counter()
        chunks = self._tokenize(image)
        try:
            prefix: list[int] = []
            suffix: list[int] = []
            emb: np.ndarray | None = None
            non_causal = False
            n_pos = 0
            decoder_pos = None
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                ctype = mtmd.mtmd_input_chunk_get_type(chunk)
                if ctype == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n_text = ctypes.c_size_t(0)
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n_text))
                    toks = [int(ptr[j]) for j in range(n_text.value)] if ptr else []
                    (prefix if emb is None else suffix).extend(toks)
                    continue
                if ctype != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                if emb is not None:
                    raise UserError(
                        f"mtmd split image {image.source} into several pieces; "
                        "that layout is not supported yet"
                    )
                rc = mtmd.mtmd_encode_chunk(self._ctx, chunk)
                if rc != 0:
                    raise UserError(f"mtmd failed to encode image {image.source} (code {rc})")
                n_tok = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
                out = mtmd.mtmd_get_output_embd(self._ctx)
                if not out:
                    raise UserError(f"mtmd returned no embeddings for {image.source}")
                flat = np.ctypeslib.as_array(out, shape=(n_tok * self.n_embd,))
                emb = np.array(flat, dtype=np.float32).reshape(n_tok, self.n_embd)
                non_causal = bool(mtmd.mtmd_decode_use_non_causal(self._ctx, chunk))
                n_pos = int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
                if self.use_mrope:
                    tokens = mtmd.mtmd_input_chunk_get_tokens_image(chunk)
                    pos = np.empty((n_tok, 4), dtype=np.int32)
                    for j in range(n_tok):
                        p = mtmd.mtmd_image_tokens_get_decoder_pos(tokens, 0, j)
                        pos[j] = (p.t, p.x, p.y, p.z)
                    decoder_pos = pos
            if emb is None:
                raise UserError(f"mtmd produced no image tokens for {image.source}")
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        return ImageEmbedding(
            digest=image.digest,
            embeddings=emb,
            non_causal=non_causal,
            encode_ms=(time.perf_counter() - t0) * 1000.0,
            prefix_tokens=tuple(prefix),
            suffix_tokens=tuple(suffix),
            n_pos=n_pos if n_pos != emb.shape[0] else 0,
            decoder_pos=decoder_pos,
        )

    def _encode_batch(self, images: Sequence[PreparedImage]) -> list[ImageEmbedding]:
        return [self._encode_one(img) for img in images]

    def _close(self) -> None:
        if self._ctx:
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None
