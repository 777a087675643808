"""Real GGUF files for tests: committed fixture checkpoints converted once per session.

    from support.models import converted, fixture_dir
    model, mmproj = converted("llava15_hf")                 # f32 / f32
    model, mmproj = converted("llava15_hf", "q8_0", "f16")

Each (fixture, quant, vision_quant) is converted at most once per test session (module-level
cache) into its own temporary folder, removed when the session ends. Fixtures whose
vision tower lives outside the checkpoint (the original LLaVA layouts) get
``tests/fixtures/clip_tower``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# MMCHAT_TEST_FIXTURES: use fixtures generated elsewhere (while regenerating them)
FIXTURES = Path(
    os.environ.get("MMCHAT_TEST_FIXTURES") or Path(__file__).resolve().parent.parent / "fixtures"
)
CLIP_TOWER = FIXTURES / "clip_tower"
# fixtures in the original LLaVA layout: their CLIP tower is a separate folder
EXTERNAL_TOWER = {"llava15_orig", "bakllava_orig", "llava16_orig"}

_cache: dict[tuple[str, str, str], tuple[Path, Path]] = {}
_lock = threading.Lock()
_root: Path | None = None


def fixture_dir(fixture: str) -> Path:
    path = FIXTURES / fixture
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"test fixture {fixture!r} is missing ({path})")
    return path


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A minimal safetensors writer (stores F32) for hand-made or damaged checkpoints."""
    import json
    import struct

    import numpy as np

    header: dict[str, object] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def _session_root() -> Path:
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="mmchat-converted-"))
        atexit.register(shutil.rmtree, _root, True)
    return _root


def converted(fixture: str, quant: str = "f32", vision_quant: str = "f32") -> tuple[Path, Path]:
    """(model GGUF, mmproj GGUF) of a fixture checkpoint, converted once per session.

    The files are shared by every test asking for the same combination: do not modify
    or move them (copy them first).
    """
    key = (fixture, quant, vision_quant)
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0].is_file() and hit[1].is_file():
            return hit
        from mmchat.converters import convert

        src = fixture_dir(fixture)
        outdir = _session_root() / f"{fixture}-{quant}-{vision_quant}"
        result = convert(
            src,
            outdir=outdir,
            name=fixture.replace("_", "-"),
            quant=quant,
            vision_quant=vision_quant,
            vision_tower=CLIP_TOWER if fixture in EXTERNAL_TOWER else None,
        )
        _cache[key] = (result.model_path, result.mmproj_path)
        return _cache[key]


class LlamaText:
    """A converted text GGUF loaded through llama-cpp-python's low-level API, set up for
    parity: flash attention off, f32 KV cache, CPU only, and no extra buffer types (the
    CPU's AMX repacking executes instructions some virtual machines do not allow even
    though the CPU reports them; plain CPU buffers work everywhere)."""

    def __init__(self, path: Path, n_ctx: int = 512) -> None:
        import llama_cpp as L

        self._L = L
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = False
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
        cp.n_threads = cp.n_threads_batch = 2
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))

    def last_logits(self, ids: list[int]) -> np.ndarray:
        import numpy as np

        L = self._L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        arr = (L.llama_token * len(ids))(*ids)  # kept alive until decode returns
        rc = L.llama_decode(self.ctx, L.llama_batch_get_one(arr, len(ids)))
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")
        p = L.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(p, shape=(self.n_vocab,)).astype(np.float64)

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        L = self._L
        raw = text.encode("utf-8")
        buf = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), add_special, parse_special)
        if n < 0:
            raise RuntimeError("token buffer too small")
        return list(buf[:n])

    def close(self) -> None:
        if self.ctx:
            self._L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self._L.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaText:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mtmd_encode(model: Path, mmproj: Path, w: int, h: int) -> tuple[int, np.ndarray, int]:
    """llama.cpp's own mtmd path on a synthetic w x h image in LLaVA's prompt format:
    (image tokens, their embeddings concatenated, number of image chunks)."""
    import ctypes

    import numpy as np
    from llama_cpp import mtmd_cpp as M

    with LlamaText(model) as llm:
        import llama_cpp as L

        n_embd = int(L.llama_model_n_embd(llm.model))
        p = M.mtmd_context_params_default()
        p.use_gpu, p.n_threads, p.warmup, p.print_timings = False, 2, False, False
        ctx = M.mtmd_init_from_file(str(mmproj).encode(), llm.model, p)
        assert ctx, "mtmd_init_from_file failed"
        try:
            assert M.mtmd_support_vision(ctx)
            pixels = bytearray((np.arange(w * h * 3) % 251).astype(np.uint8).tobytes())
            bmp = M.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * len(pixels)).from_buffer(pixels))
            chunks = M.mtmd_input_chunks_init()
            prompt = b"USER: " + M.mtmd_default_marker() + b"\nWhat is this? ASSISTANT:"
            txt = M.mtmd_input_text()
            txt.text, txt.text_len, txt.add_special, txt.parse_special = (
                prompt,
                len(prompt),
                True,
                True,
            )
            try:
                rc = M.mtmd_tokenize(
                    ctx, chunks, ctypes.byref(txt), (M.mtmd_bitmap_p_ctypes * 1)(bmp), 1
                )
                assert rc == 0
                total, embs = 0, []
                for i in range(M.mtmd_input_chunks_size(chunks)):
                    chunk = M.mtmd_input_chunks_get(chunks, i)
                    if M.mtmd_input_chunk_get_type(chunk) != 1:  # image
                        continue
                    n = int(M.mtmd_input_chunk_get_n_tokens(chunk))
                    assert M.mtmd_encode_chunk(ctx, chunk) == 0
                    out = M.mtmd_get_output_embd(ctx)
                    embs.append(np.ctypeslib.as_array(out, shape=(n * n_embd,)).copy())
                    total += n
            finally:
                M.mtmd_input_chunks_free(chunks)
                M.mtmd_bitmap_free(bmp)
        finally:
            M.mtmd_free(ctx)
    return total, np.concatenate(embs), len(embs)
