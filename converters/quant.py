"""Output tensor types: the quantization names users pick, llama.cpp's per-tensor policy for
the mixes, and encoding float32 arrays into ggml block formats with ggml's own quantizers.

Encoding
--------
* F32/F16 are plain numpy casts (round to nearest even, like ggml's own conversion); BF16
  uses gguf-py's rounding (the same one llama.cpp's converter uses).
* Every block type goes through ``ggml_quantize_chunk`` of the ``libggml-base`` that
  llama-cpp-python ships (loaded with ctypes after ``llama_cpp`` itself, so it is the very
  library the runtime uses). Rows are split across a thread pool; ctypes releases the GIL,
  so all cores quantize. Each encoded chunk is checked with ``ggml_validate_row_data``.

Per-tensor policy of the text mixes (the rules of llama.cpp's ``llama_tensor_get_type`` for
a dense Llama/Mistral model, applied here in the same single pass that writes the file)
---------------------------------------------------------------------------------------
* Only tensors whose name ends in ``.weight`` with two or more dimensions are quantized;
  ``*_norm.weight``, 1-D tensors, biases and T5's ``attn_rel_b.weight`` (its relative-position
  bucket biases, as llama.cpp's quantizer leaves them) stay F32 (also at f16/bf16).
* ``output.weight`` (or ``token_embd.weight`` when the embeddings are tied): Q8_0 when its
  row length is not a multiple of the base type's block, else Q6_K unless the base type
  is Q8_0.
* ``attn_v.weight`` of layer i (n layers; ``more(i)`` = i < n/8 or i >= 7n/8 or
  (i - n/8) % 3 == 2): Q2_K -> Q4_K if n_head/n_head_kv >= 4 else Q3_K; Q3_K_M -> Q5_K
  for i < 2 else Q4_K; Q3_K_L -> Q5_K; Q4_K_M/Q5_K_M -> Q6_K when more(i); Q4_K_S -> Q5_K
  for i < 4.
* ``ffn_down.weight``: Q2_K -> Q3_K; Q3_K_M -> Q5_K for i < n/16 else Q4_K; Q3_K_L -> Q5_K;
  Q4_K_M/Q5_K_M -> Q6_K when more(i); Q4_K_S -> Q5_K for i < n/8.
* ``attn_output.weight``: Q2_K -> Q3_K; Q3_K_M -> Q4_K; Q3_K_L -> Q5_K.
* Every other 2-D weight (token_embd, attn_q/k, ffn_gate/up) takes the mix's base type.
* Shape fallback (llama.cpp's ``tensor_type_fallback``): when a row length is not a
  multiple of the chosen type's block size, Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0; if that still does not divide the row, F16.
Not applied (no LLaVA model has them): the 70B attn_v bump, the MoE and Falcon rules.

Vision tower and projector (``--vision-quant``): 2-D ``.weight`` tensors of the blocks and
the projector take the chosen type (with the same shape fallback); norms, biases and the
class embedding stay F32; the patch and position embeddings stay F16 (F32 when the whole
file is F32) -- the tensors llama.cpp's own quantizer leaves alone as well.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from mmchat.errors import UserError

T = GGMLQuantizationType


@dataclass(frozen=True)
class TextQuant:
    name: str
    ftype: LlamaFileType
    base: GGMLQuantizationType


TEXT_QUANTS: dict[str, TextQuant] = {
    q.name: q
    for q in (
        TextQuant("f32", LlamaFileType.ALL_F32, T.F32),
        TextQuant("f16", LlamaFileType.MOSTLY_F16, T.F16),
        TextQuant("bf16", LlamaFileType.MOSTLY_BF16, T.BF16),
        TextQuant("q8_0", LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
        TextQuant("q6_k", LlamaFileType.MOSTLY_Q6_K, T.Q6_K),
        TextQuant("q5_k_m", LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K),
        TextQuant("q5_k_s", LlamaFileType.MOSTLY_Q5_K_S, T.Q5_K),
        TextQuant("q5_1", LlamaFileType.MOSTLY_Q5_1, T.Q5_1),
        TextQuant("q5_0", LlamaFileType.MOSTLY_Q5_0, T.Q5_0),
        TextQuant("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K),
        TextQuant("q4_k_s", LlamaFileType.MOSTLY_Q4_K_S, T.Q4_K),
        TextQuant("q4_1", LlamaFileType.MOSTLY_Q4_1, T.Q4_1),
        TextQuant("q4_0", LlamaFileType.MOSTLY_Q4_0, T.Q4_0),
        TextQuant("q3_k_l", LlamaFileType.MOSTLY_Q3_K_L, T.Q3_K),
        TextQuant("q3_k_m", LlamaFileType.MOSTLY_Q3_K_M, T.Q3_K),
        TextQuant("q3_k_s", LlamaFileType.MOSTLY_Q3_K_S, T.Q3_K),
        TextQuant("q2_k", LlamaFileType.MOSTLY_Q2_K, T.Q2_K),
    )
}

VISION_QUANTS: dict[str, GGMLQuantizationType] = {
    "f32": T.F32,
    "f16": T.F16,
    "bf16": T.BF16,
    "q8_0": T.Q8_0,
    "q6_k": T.Q6_K,
    "q5_k": T.Q5_K,
    "q5_1": T.Q5_1,
    "q5_0": T.Q5_0,
    "q4_k": T.Q4_K,
    "q4_1": T.Q4_1,
    "q4_0": T.Q4_0,
    "q3_k": T.Q3_K,
    "q2_k": T.Q2_K,
}

VISION_FTYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    T.F32: LlamaFileType.ALL_F32,
    T.F16: LlamaFileType.MOSTLY_F16,
    T.BF16: LlamaFileType.MOSTLY_BF16,
    T.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    T.Q6_K: LlamaFileType.MOSTLY_Q6_K,
    T.Q5_K: LlamaFileType.MOSTLY_Q5_K_M,
    T.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    T.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    T.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
    T.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    T.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    T.Q3_K: LlamaFileType.MOSTLY_Q3_K_M,
    T.Q2_K: LlamaFileType.MOSTLY_Q2_K,
}

FLOAT_TYPES = (T.F32, T.F16, T.BF16)


def parse_text_quant(name: str) -> TextQuant:
    q = TEXT_QUANTS.get(name.strip().lower())
    if q is None:
        raise UserError(f"Unknown --quant {name!r}; choose one of: {', '.join(TEXT_QUANTS)}")
    return q


def parse_vision_quant(name: str) -> GGMLQuantizationType:
    key = name.strip().lower()
    q = VISION_QUANTS.get(key)
    if q is None:
        raise UserError(
            f"Unknown --vision-quant {name!r}; choose one of: {', '.join(VISION_QUANTS)}"
        )
    return q


def block_size(t: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[t][0]


def nbytes_for(t: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    bs, ts = GGML_QUANT_SIZES[t]
    n = int(np.prod(shape)) if shape else 1
    return n // bs * ts


def shape_fallback(t: GGMLQuantizationType, ncols: int) -> GGMLQuantizationType:
    if t in FLOAT_TYPES or ncols % block_size(t) == 0:
        return t
    alt = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}.get(t, t)
    if ncols % block_size(alt) != 0:
        return T.F16
    return alt


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_LAYER = re.compile(r"^blk\.(\d+)\.")


def text_tensor_type(
    q: TextQuant,
    name: str,
    shape: tuple[int, ...],
    *,
    n_layer: int,
    n_gqa: int,
    tied_output: bool,
) -> GGMLQuantizationType:
    """The type of one text tensor (``shape`` in numpy order, row length last)."""
    if len(shape) < 2 or not name.endswith(".weight") or name.endswith("_norm.weight"):
        return T.F32
    if name.endswith("attn_rel_b.weight"):  # T5's bucket biases: tiny, never quantized
        return T.F32
    if q.base in FLOAT_TYPES:
        return q.base
    f = LlamaFileType
    ft = q.ftype
    new = q.base
    ncols = shape[-1]
    m = _LAYER.match(name)
    i = int(m.group(1)) if m else 0
    n = n_layer
    if name == "output.weight" or (tied_output and name == "token_embd.weight"):
        if ncols % block_size(new) != 0:
            new = T.Q8_0
        elif new != T.Q8_0:
            new = T.Q6_K
    elif ".attn_v.weight" in name:
        if ft == f.MOSTLY_Q2_K:
            new = T.Q4_K if n_gqa >= 4 else T.Q3_K
        elif ft == f.MOSTLY_Q3_K_M:
            new = T.Q5_K if i < 2 else T.Q4_K
        elif ft == f.MOSTLY_Q3_K_L:
            new = T.Q5_K
        elif ft in (f.MOSTLY_Q4_K_M, f.MOSTLY_Q5_K_M) and _more_bits(i, n):
            new = T.Q6_K
        elif ft == f.MOSTLY_Q4_K_S and i < 4:
            new = T.Q5_K
    elif ".ffn_down" in name:
        if ft == f.MOSTLY_Q2_K:
            new = T.Q3_K
        elif ft == f.MOSTLY_Q3_K_M:
            new = T.Q5_K if i < n // 16 else T.Q4_K
        elif ft == f.MOSTLY_Q3_K_L:
            new = T.Q5_K
        elif ft in (f.MOSTLY_Q4_K_M, f.MOSTLY_Q5_K_M) and _more_bits(i, n):
            new = T.Q6_K
        elif ft == f.MOSTLY_Q4_K_S and i < n // 8:
            new = T.Q5_K
    elif ".attn_output.weight" in name:
        if ft == f.MOSTLY_Q2_K:
            new = T.Q3_K
        elif ft == f.MOSTLY_Q3_K_M:
            new = T.Q4_K
        elif ft == f.MOSTLY_Q3_K_L:
            new = T.Q5_K
    return shape_fallback(new, ncols)


def vision_tensor_type(
    chosen: GGMLQuantizationType, name: str, shape: tuple[int, ...]
) -> GGMLQuantizationType:
    if chosen == T.F32:
        return T.F32
    if "position_embd" in name or "patch_embd" in name:
        return T.F16 if len(shape) >= 2 else T.F32
    if len(shape) != 2 or not name.endswith(".weight") or "norm" in name:
        return T.F32
    return shape_fallback(chosen, shape[-1])


# --- ggml's quantizers through ctypes -----------------------------------------------------


class _Ggml:
    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.quantize_chunk = lib.ggml_quantize_chunk
        self.quantize_chunk.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        self.quantize_chunk.restype = ctypes.c_size_t
        self.row_size = lib.ggml_row_size
        self.row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        self.row_size.restype = ctypes.c_size_t
        self.requires_imatrix = lib.ggml_quantize_requires_imatrix
        self.requires_imatrix.argtypes = [ctypes.c_int]
        self.requires_imatrix.restype = ctypes.c_bool
        self.validate = lib.ggml_validate_row_data
        self.validate.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        self.validate.restype = ctypes.c_bool


_GGML: _Ggml | None = None


def _lib_names() -> list[str]:
    if sys.platform == "darwin":
        return ["libggml-base.dylib"]
    if sys.platform == "win32":
        return ["ggml-base.dll"]
    return ["libggml-base.so.0", "libggml-base.so"]  # the soname libllama links first: one copy


def ggml() -> _Ggml:
    """ggml's C quantizers from the libggml-base that llama-cpp-python installs."""
    global _GGML
    if _GGML is not None:
        return _GGML
    try:
        import llama_cpp  # loads the very libggml-base the runtime uses
    except Exception as exc:
        raise UserError(
            f"Quantizing needs llama-cpp-python (its ggml library), which failed to load: {exc}"
        ) from exc
    base = Path(llama_cpp.__file__).parent
    for d in (base / "lib", base, base.parent / "lib"):
        for n in _lib_names():
            p = d / n
            if p.is_file():
                _GGML = _Ggml(ctypes.CDLL(str(p)), p)
                return _GGML
    raise UserError(
        f"Quantizing needs ggml's library, but no {_lib_names()[0]} was found next to "
        f"llama_cpp in {base}"
    )


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


def encode(
    data: np.ndarray, t: GGMLQuantizationType, *, pool: ThreadPoolExecutor | None = None
) -> np.ndarray:
    """float32 ``data`` (row length last) -> the bytes/array written for type ``t``."""
    if t == T.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if t == T.F16:
        return np.ascontiguousarray(data, dtype=np.float32).astype(np.float16)
    if t == T.BF16:
        from gguf.quants import quantize

        return quantize(np.ascontiguousarray(data, dtype=np.float32), T.BF16)
    g = ggml()
    src = np.ascontiguousarray(data, dtype=np.float32)
    ncols = src.shape[-1]
    nrows = src.size // ncols
    if ncols % block_size(t) != 0:
        raise ValueError(f"row length {ncols} is not a multiple of the {t.name} block")
    if g.requires_imatrix(int(t)):
        raise UserError(f"{t.name} needs an importance matrix, which convert does not compute")
    row_bytes = int(g.row_size(int(t), ncols))
    out = np.empty(nrows * row_bytes, dtype=np.uint8)
    src_ptr = src.ctypes.data
    dst_ptr = out.ctypes.data

    def work(r0: int, r1: int) -> None:
        done = g.quantize_chunk(int(t), src_ptr, dst_ptr, r0 * ncols, r1 - r0, ncols, None)
        if done != (r1 - r0) * row_bytes:
            raise RuntimeError(f"ggml_quantize_chunk wrote {done} bytes for {t.name}")
        if not g.validate(int(t), dst_ptr + r0 * row_bytes, done):
            raise RuntimeError(f"ggml produced invalid {t.name} data")

    n_workers = pool._max_workers if pool is not None else 1
    if pool is None or n_workers < 2 or nrows < 2 or src.size < 65536:
        work(0, nrows)
    else:
        n_chunks = min(nrows, n_workers * 4)
        bounds = np.linspace(0, nrows, n_chunks + 1).astype(int)
        futures = [
            pool.submit(work, int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a
        ]
        for fut in futures:
            fut.result()
    # keep src alive until every worker finished (they read through a raw pointer)
    del src
    return out
