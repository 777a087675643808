"""Helpers of the NeVA tests (tests/test_neva_*.py): the fixtures, a torch marker, a
decode with image rows in place, archive writing and the failed-conversion check."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmchat.errors import UserError

FX = Path(__file__).resolve().parent.parent / "fixtures" / "neva"

try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False
needs_torch = pytest.mark.skipif(
    not HAVE_TORCH, reason="reading a .nemo's model_weights.ckpt needs torch (weights_only)"
)


def decode_with_image(model: Path, ids: list[int], first: int, rows: np.ndarray) -> np.ndarray:
    """Last-position logits of ``ids`` with rows[k] in place of position first + k."""
    import llama_cpp as L

    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = False
    lm = L.llama_model_load_from_file(str(model).encode(), mp)
    assert lm
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 512
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.type_k = cp.type_v = 0
    cp.n_threads = cp.n_threads_batch = 2
    ctx = L.llama_init_from_model(lm, cp)
    try:
        n = rows.shape[0]
        segs: list[tuple[int, Any]] = [
            (0, ids[:first]),
            (first, rows),
            (first + n, ids[first + n :]),
        ]
        for pos, seg in segs:
            k = len(seg)
            is_emb = isinstance(seg, np.ndarray)
            batch = L.llama_batch_init(k, seg.shape[1] if is_emb else 0, 1)
            try:
                batch.n_tokens = k
                flat = np.ascontiguousarray(seg, dtype=np.float32).ravel() if is_emb else None
                for j in range(k):
                    if is_emb:
                        assert flat is not None
                        w = seg.shape[1]
                        for e in range(w):
                            batch.embd[j * w + e] = float(flat[j * w + e])
                    else:
                        batch.token[j] = int(seg[j])
                    batch.pos[j] = pos + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = pos + j == len(ids) - 1
                assert L.llama_decode(ctx, batch) == 0
            finally:
                L.llama_batch_free(batch)
        n_vocab = int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(lm)))
        p = L.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(p, shape=(n_vocab,)).astype(np.float64)
    finally:
        L.llama_free(ctx)
        L.llama_model_free(lm)


def write_tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def convert_fails(src: Path, out: Path, match: str) -> None:
    from mmchat.converters import convert

    with pytest.raises(UserError, match=match):
        convert(src, outdir=out, quant="f32", vision_tower=FX / "clip_tower")
    assert not out.exists() or not any(out.iterdir())
