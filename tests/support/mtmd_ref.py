"""llama.cpp's own multimodal path, as a reference for parity tests (no torch needed).

    from support.mtmd_ref import mtmd_reference, MARKER
    ref = mtmd_reference(model_gguf, mmproj_gguf,
                         "<start_of_turn>user\\n" + MARKER + "What is this?<end_of_turn>\\n",
                         [Path("img.png")])
    ref.logits        # np.float32 [n_vocab], last position
    ref.chunks        # [Chunk(kind="text", tokens=(...), n_tokens=.., n_pos=..), ...]

It runs exactly what llama.cpp's tools do, through llama-cpp-python's ctypes bindings:
``llama_model_load_from_file`` (CPU, n_gpu_layers 0), a context with an f32 KV cache and
flash attention off, ``mtmd_init_from_file``, ``mtmd_helper_bitmap_init_from_file`` (or
``mtmd_helper_bitmap_init_from_buf`` for in-memory files), ``mtmd_tokenize`` and
``mtmd_helper_eval_chunks(..., logits_last=True)``. Two threads. Every ctypes buffer handed
to llama.cpp stays referenced from Python until the call that reads it has returned, and
everything allocated is freed before the function returns (also on errors).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# mtmd's default media marker; llama_cpp reports the same through mtmd_default_marker()
MARKER = "<__media__>"

CHUNK_KINDS = {0: "text", 1: "image", 2: "audio"}


@dataclass(frozen=True)
class Chunk:
    """One piece of mtmd's tokenized input."""

    kind: str  # "text" | "image" | "audio"
    n_tokens: int
    n_pos: int
    tokens: tuple[int, ...] = ()  # the token ids of a text chunk, empty for media
    nx: int = 0  # image chunks: token grid width/height (0 when not an image)
    ny: int = 0


@dataclass
class Reference:
    logits: np.ndarray  # float32 [n_vocab], the last position
    chunks: list[Chunk] = field(default_factory=list)
    n_past: int = 0  # position after the prompt (what mtmd_helper_eval_chunks returned)
    use_mrope: bool = False
    n_vocab: int = 0

    @property
    def media_chunks(self) -> list[Chunk]:
        return [c for c in self.chunks if c.kind != "text"]

    def layout(self) -> list[tuple[str, int, int]]:
        """(kind, n_tokens, n_pos) per chunk, for compact assertions."""
        return [(c.kind, c.n_tokens, c.n_pos) for c in self.chunks]


def _marker() -> str:
    from llama_cpp import mtmd_cpp as M

    raw = M.mtmd_default_marker()
    return raw.decode() if raw else MARKER


def mtmd_reference(
    model: Path,
    mmproj: Path,
    prompt: str,
    media: Sequence[Path | bytes],
    *,
    n_ctx: int = 4096,
    n_batch: int = 512,
    add_special: bool = True,
    parse_special: bool = True,
    n_threads: int = 2,
) -> Reference:
    """Last-position logits and chunk layout of llama.cpp's own mtmd path.

    ``prompt`` holds one media marker (:data:`MARKER`) per item of ``media``; each item is
    a file path or the bytes of a file (image or audio, whatever mtmd's helper decodes).
    Raises RuntimeError when llama.cpp refuses something (the message says which step).
    """
    import llama_cpp as L
    from llama_cpp import mtmd_cpp as M

    if prompt.count(_marker()) != len(media):
        raise ValueError(
            f"prompt has {prompt.count(_marker())} media marker(s) for {len(media)} item(s)"
        )
    keep: list[Any] = []  # every ctypes object llama.cpp may read from
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    if hasattr(mp, "use_extra_bufts"):
        # plain CPU buffers: AMX repacking can use instructions a VM does not allow
        mp.use_extra_bufts = False
    lmodel = L.llama_model_load_from_file(str(model).encode(), mp)
    if not lmodel:
        raise RuntimeError(f"llama.cpp could not load the model {model}")
    lctx = None
    mctx = None
    chunks = None
    bitmaps: list[Any] = []
    try:
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = n_batch
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
        cp.n_threads = cp.n_threads_batch = n_threads
        lctx = L.llama_init_from_model(lmodel, cp)
        if not lctx:
            raise RuntimeError(f"llama.cpp could not create a context for {model}")
        vocab = L.llama_model_get_vocab(lmodel)
        n_vocab = int(L.llama_vocab_n_tokens(vocab))

        mparams = M.mtmd_context_params_default()
        mparams.use_gpu = False
        mparams.n_threads = n_threads
        mparams.print_timings = False
        mparams.warmup = False
        mparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        mctx = M.mtmd_init_from_file(str(mmproj).encode(), lmodel, mparams)
        if not mctx:
            raise RuntimeError(f"mtmd_init_from_file failed for {mmproj}")

        for item in media:
            if isinstance(item, bytes):
                buf = (ctypes.c_uint8 * len(item)).from_buffer_copy(item)
                keep.append(buf)
                bmp = M.mtmd_helper_bitmap_init_from_buf(mctx, buf, len(item), False)
                what = f"{len(item)} bytes"
            else:
                bmp = M.mtmd_helper_bitmap_init_from_file(mctx, str(item).encode(), False)
                what = str(item)
            if not bmp:
                raise RuntimeError(f"mtmd could not read the media {what}")
            bitmaps.append(bmp)

        chunks = M.mtmd_input_chunks_init()
        raw = prompt.encode("utf-8")
        keep.append(raw)
        text = M.mtmd_input_text()
        text.text = raw
        text.text_len = len(raw)
        text.add_special = add_special
        text.parse_special = parse_special
        keep.append(text)
        arr = (M.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
        keep.append(arr)
        rc = M.mtmd_tokenize(mctx, chunks, ctypes.byref(text), arr, len(bitmaps))
        if rc != 0:
            raise RuntimeError(f"mtmd_tokenize failed ({rc})")

        layout: list[Chunk] = []
        for i in range(int(M.mtmd_input_chunks_size(chunks))):
            ch = M.mtmd_input_chunks_get(chunks, i)
            kind = CHUNK_KINDS.get(int(M.mtmd_input_chunk_get_type(ch)), "?")
            n_tok = int(M.mtmd_input_chunk_get_n_tokens(ch))
            n_pos = int(M.mtmd_input_chunk_get_n_pos(ch))
            toks: tuple[int, ...] = ()
            nx = ny = 0
            if kind == "text":
                n_out = ctypes.c_size_t(0)
                ptr = M.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n_out))
                toks = tuple(int(ptr[j]) for j in range(n_out.value)) if ptr else ()
            elif kind == "image":
                img = M.mtmd_input_chunk_get_tokens_image(ch)
                if img and hasattr(M, "mtmd_image_tokens_get_nx"):
                    nx = int(M.mtmd_image_tokens_get_nx(img))
                    ny = int(M.mtmd_image_tokens_get_ny(img))
            layout.append(Chunk(kind, n_tok, n_pos, toks, nx, ny))

        new_n_past = L.llama_pos(0)
        from mmchat.vision.mtmd import img_break_row

        brk = img_break_row(mmproj)
        if brk is None:
            rc = M.mtmd_helper_eval_chunks(
                mctx, lctx, chunks, 0, 0, n_batch, True, ctypes.byref(new_n_past)
            )
            if rc != 0:
                raise RuntimeError(f"mtmd_helper_eval_chunks failed ({rc})")
        else:
            _eval_pixtral(M, mctx, lctx, chunks, n_batch, brk, new_n_past)
        ptr = L.llama_get_logits_ith(lctx, -1)
        if not ptr:
            raise RuntimeError("llama.cpp returned no logits for the last position")
        logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float32, copy=True)
        return Reference(
            logits=logits,
            chunks=layout,
            n_past=int(new_n_past.value),
            use_mrope=bool(M.mtmd_decode_use_mrope(mctx)),
            n_vocab=n_vocab,
        )
    finally:
        if chunks is not None:
            M.mtmd_input_chunks_free(chunks)
        for bmp in bitmaps:
            M.mtmd_bitmap_free(bmp)
        if mctx is not None:
            M.mtmd_free(mctx)
        if lctx is not None:
            L.llama_free(lctx)
        L.llama_model_free(lmodel)
        del keep


def _eval_pixtral(
    M: Any, mctx: Any, lctx: Any, chunks: Any, n_batch: int, brk: np.ndarray, n_past: Any
) -> None:
    """``mtmd_helper_eval_chunks`` spelled out (the same helper calls, chunk by chunk), with
    one repair: llama.cpp's Pixtral graph computes each [IMG_BREAK] row as 0 * (an
    uninitialised tensor) + img_break, which is NaN whenever that memory holds a NaN or an
    infinity (it depends on the allocator, so llama.cpp's own path fails at random). The
    repaired rows are what that graph computes when the memory is finite: img_break itself
    (mmchat's engine does the same: ``mmchat.vision.mtmd.repair_image_breaks``)."""
    from mmchat.vision.mtmd import repair_image_breaks

    n = int(M.mtmd_input_chunks_size(chunks))
    for i in range(n):
        ch = M.mtmd_input_chunks_get(chunks, i)
        last = i == n - 1
        if int(M.mtmd_input_chunk_get_type(ch)) == int(M.MTMD_INPUT_CHUNK_TYPE_TEXT):
            rc = M.mtmd_helper_eval_chunk_single(
                mctx, lctx, ch, n_past.value, 0, n_batch, last, ctypes.byref(n_past)
            )
            if rc != 0:
                raise RuntimeError(f"mtmd_helper_eval_chunk_single failed ({rc})")
            continue
        if M.mtmd_encode_chunk(mctx, ch) != 0:
            raise RuntimeError("mtmd_encode_chunk failed")
        n_tok = int(M.mtmd_input_chunk_get_n_tokens(ch))
        out = M.mtmd_get_output_embd(mctx)
        rows = np.ctypeslib.as_array(out, shape=(n_tok * brk.shape[0],)).reshape(n_tok, -1)
        rows[...] = repair_image_breaks(rows.copy(), brk)
        no_callback = M.mtmd_helper_post_decode_callback()  # a NULL function pointer
        rc = M.mtmd_helper_decode_image_chunk(
            mctx, lctx, ch, out, n_past.value, 0, n_batch, ctypes.byref(n_past), no_callback, None
        )
        if rc != 0:
            raise RuntimeError(f"mtmd_helper_decode_image_chunk failed ({rc})")


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L2 error of ``a`` against reference ``b`` (float64)."""
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))
