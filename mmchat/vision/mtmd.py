"""Non-LLaVA projectors on llama.cpp's mtmd (through llama-cpp-python's ``mtmd_cpp``).

One image or audio clip goes through ``mtmd_tokenize`` alone (mtmd's media marker with one
bitmap), and what comes back is kept as the media item's layout: text chunks (the family's
wrappers, tile separators, row breaks) become ``TextSpan``s, image/audio chunks become
``EmbedSpan``s with their ``n_pos`` and causal flag; M-RoPE models also get each row's
(t, y, x, z) positions. mtmd does its own preprocessing (from the RGB pixels of the
``PreparedImage``, or the bytes of a ``PreparedAudio``, which it decodes itself).
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
from mmchat.vision.audio import PreparedAudio
from mmchat.vision.cache import EmbeddingCache
from mmchat.vision.engine import ImageEmbedding, VisionEngine
from mmchat.vision.image import PreparedImage
from mmchat.vision.layout import EmbedSpan, Layout, Span, TextSpan, layout_rows

Media = PreparedImage | PreparedAudio

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
            line = " ".join(text.decode(errors="replace").split())  # one line
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


def repair_image_breaks(rows: np.ndarray, brk: np.ndarray) -> np.ndarray:
    """Pixtral's ``[IMG_BREAK]`` rows, recomputed where llama.cpp's graph left them NaN.

    mtmd's Pixtral graph builds the break rows as ``0 * (uninitialised tensor) +
    img_break``; when the uninitialised memory holds a NaN or an infinity, the row is NaN
    (it depends on what the allocator hands out, so it comes and goes). The right value of
    every break row is ``img_break`` itself. The rows are laid out ``p_y`` image rows of
    ``p_x`` patches, each but the last followed by a break; the layout is the one whose
    break positions cover every non-finite row while its finite break rows already equal
    ``img_break``. Rows are returned unchanged when no such layout exists.
    """
    bad = ~np.isfinite(rows).all(axis=1)
    if not bad.any():
        return rows
    n = rows.shape[0]
    for p_y in range(2, n + 2):
        if (n + 1) % p_y:
            continue
        period = (n + 1) // p_y  # p_x + 1
        breaks = np.arange(period - 1, n, period)
        if not bad[np.setdiff1d(np.arange(n), breaks)].any() and all(
            bad[i] or np.array_equal(rows[i], brk) for i in breaks
        ):
            fixed = rows.copy()
            fixed[breaks] = brk
            return fixed
    return rows


class MtmdEngine(VisionEngine):
    """Any mmproj llama.cpp's mtmd supports (vision and/or audio); embeddings via
    ``mtmd_encode_chunk``, one call per image/audio chunk."""

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
        flash_attn: bool | None = None,
    ) -> None:
        import os

        import llama_cpp
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
        if flash_attn is not None:  # None: llama.cpp's choice (auto)
            params.flash_attn_type = (
                llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
                if flash_attn
                else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        _recent.clear()
        self._ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llama_model, params)
        if not self._ctx:
            why = _last_error()
            raise CorruptFileError(
                f"llama.cpp (mtmd) cannot load projector {mmproj}"
                + (f": {why}" if why else " (wrong projector for this model, or unsupported)")
            )
        self.supports_vision = bool(mtmd.mtmd_support_vision(self._ctx))
        self.supports_audio = bool(mtmd.mtmd_support_audio(self._ctx))
        if not (self.supports_vision or self.supports_audio):
            self._close()
            raise UserError(f"{mmproj} has neither a vision nor an audio encoder")
        self.projector_type = projector_type
        self.n_embd = int(text_n_embd)
        self.image_size = 0  # mtmd picks the size per image
        self.use_mrope = bool(mtmd.mtmd_decode_use_mrope(self._ctx))
        self._layouts: dict[str, Layout] = {}
        self._img_break = img_break_row(mmproj) if projector_type == "pixtral" else None

    # one input -> its chunks -------------------------------------------------------------
    def _bitmap(self, media: Media) -> Any:
        mtmd = self._mtmd
        if isinstance(media, PreparedAudio):
            if not self.supports_audio:
                raise UserError("this model cannot hear audio (its projector has no audio encoder)")
            buf = (ctypes.c_uint8 * len(media.data)).from_buffer_copy(media.data)
            bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(self._ctx, buf, len(media.data), False)
            if not bitmap:
                raise UserError(f"mtmd cannot decode audio {media.source} ({media.format})")
            if not mtmd.mtmd_bitmap_is_audio(bitmap):
                mtmd.mtmd_bitmap_free(bitmap)
                raise UserError(f"{media.source} is not an audio file")
            return bitmap
        if not self.supports_vision:
            raise UserError("this model cannot see images (its projector is audio-only)")
        rgb = media.image.tobytes()
        buf = (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb)
        bitmap = mtmd.mtmd_bitmap_init(media.width, media.height, buf)
        if not bitmap:
            raise UserError(f"mtmd cannot take image {media.source}")
        return bitmap

    def _tokenize(self, media: Media) -> Any:
        mtmd = self._mtmd
        if not self._ctx:
            raise UserError("the vision engine was closed")
        bitmap = self._bitmap(media)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            mtmd.mtmd_bitmap_set_id(bitmap, media.digest.encode())
            marker = mtmd.mtmd_default_marker()
            text = mtmd.mtmd_input_text()
            text.text = marker
            text.text_len = len(marker)
            text.add_special = False
            text.parse_special = True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                why = _last_error()
                raise UserError(
                    f"mtmd could not preprocess {media.source} (code {rc})"
                    + (f": {why}" if why else "")
                )
        except BaseException:
            mtmd.mtmd_input_chunks_free(chunks)
            raise
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        return chunks

    def _spans(self, chunks: Any) -> list[tuple[Span, Any]]:
        """The chunks as spans, each with its chunk (for encoding)."""
        mtmd = self._mtmd
        out: list[tuple[Span, Any]] = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            ctype = mtmd.mtmd_input_chunk_get_type(chunk)
            if ctype == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n_text = ctypes.c_size_t(0)
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n_text))
                toks = tuple(int(ptr[j]) for j in range(n_text.value)) if ptr else ()
                if toks:
                    out.append((TextSpan(toks), chunk))
                continue
            n_tok = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            n_pos = int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
            non_causal = bool(mtmd.mtmd_decode_use_non_causal(self._ctx, chunk))
            span = EmbedSpan(n_tok, 0 if n_pos == n_tok else n_pos, non_causal)
            out.append((span, chunk))
        return out

    def layout(self, image: Media) -> Layout:
        known = self._layouts.get(image.digest)
        if known is None:
            with self._lock:
                chunks = self._tokenize(image)
                try:
                    known = tuple(span for span, _ in self._spans(chunks))
                finally:
                    self._mtmd.mtmd_input_chunks_free(chunks)
            if not any(isinstance(s, EmbedSpan) for s in known):
                raise UserError(f"mtmd produced no embeddings for {image.source}")
            self._layouts[image.digest] = known
        return known

    def tokens_for(self, image: Media) -> int:
        return layout_rows(self.layout(image))

    def _rel_pos(self, chunk: Any, n_tok: int) -> np.ndarray:
        """(t, y, x, z) of each row of an image chunk for a start at 0, and which sections
        move with the start (probed at 0 and 1)."""
        mtmd = self._mtmd
        out = np.empty((n_tok, 4), dtype=np.int32)
        if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            line = np.arange(n_tok, dtype=np.int32)  # audio: 1-D positions in every section
            return np.stack([line] * 4, axis=1)
        tokens = mtmd.mtmd_input_chunk_get_tokens_image(chunk)
        for j in range(n_tok):
            p = mtmd.mtmd_image_tokens_get_decoder_pos(tokens, 0, j)
            out[j] = (p.t, p.y, p.x, p.z)
        return out

    def _pos_shift(self, chunk: Any) -> tuple[int, int, int, int]:
        mtmd = self._mtmd
        if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            return (1, 1, 1, 1)
        tokens = mtmd.mtmd_input_chunk_get_tokens_image(chunk)
        a = mtmd.mtmd_image_tokens_get_decoder_pos(tokens, 0, 0)
        b = mtmd.mtmd_image_tokens_get_decoder_pos(tokens, 1, 0)
        return (b.t - a.t, b.y - a.y, b.x - a.x, b.z - a.z)

    def _encode_one(self, media: Media) -> ImageEmbedding:
        mtmd = self._mtmd
        t0 = time.perf_counter()
        chunks = self._tokenize(media)
        try:
            spans = self._spans(chunks)
            blocks: list[np.ndarray] = []
            rel: list[np.ndarray] = []
            shift = (1, 1, 1, 1)
            for span, chunk in spans:
                if not isinstance(span, EmbedSpan):
                    continue
                rc = mtmd.mtmd_encode_chunk(self._ctx, chunk)
                if rc != 0:
                    raise UserError(f"mtmd failed to encode {media.source} (code {rc})")
                out = mtmd.mtmd_get_output_embd(self._ctx)
                if not out:
                    raise UserError(f"mtmd returned no embeddings for {media.source}")
                n_tok = span.n_tokens
                flat = np.ctypeslib.as_array(out, shape=(n_tok * self.n_embd,))
                block = np.array(flat, dtype=np.float32).reshape(n_tok, self.n_embd)
                if self._img_break is not None and self._img_break.shape[0] == self.n_embd:
                    block = repair_image_breaks(block, self._img_break)
                blocks.append(block)
                if self.use_mrope:
                    rel.append(self._rel_pos(chunk, n_tok))
                    s = self._pos_shift(chunk)
                    if s != (1, 1, 1, 1):
                        shift = s
            if not blocks:
                raise UserError(f"mtmd produced no embeddings for {media.source}")
            layout = tuple(span for span, _ in spans)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        self._layouts[media.digest] = layout
        return ImageEmbedding(
            digest=media.digest,
            embeddings=np.ascontiguousarray(np.concatenate(blocks, axis=0)),
            layout=layout,
            encode_ms=(time.perf_counter() - t0) * 1000.0,
            rel_pos=np.concatenate(rel, axis=0) if rel else None,
            pos_shift=shift,
        )

    def _encode_batch(self, images: Sequence[PreparedImage]) -> list[ImageEmbedding]:
        return [self._encode_one(img) for img in images]

    def _close(self) -> None:
        if self._ctx:
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None


def img_break_row(mmproj: Path) -> np.ndarray | None:
    """Pixtral's ``v.token_embd.img_break`` row (float32), when the file has one."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(mmproj))
    except Exception:
        return None
    for t in reader.tensors:
        if t.name == "v.token_embd.img_break":
            return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)
    return None
