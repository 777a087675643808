"""How much memory a model needs, against what the machine has, before loading it.

The estimate reads only GGUF headers: the weights (both files' tensor bytes, which llama.cpp
maps or copies whole), the KV cache for the context (``n_layer x n_ctx x 2 x n_head_kv x
head_dim`` elements, f16 by default; for a cross-attention decoder — IDEFICS, OpenFlamingo —
also the image keys/values its gated blocks hold: ``2 x width x rows x slots`` per block, where
width is the block's key width, rows the Perceiver's latents and slots the images the
context keeps at once), and a compute reserve (llama.cpp's graph buffers:
about one micro-batch of activations plus the output logits, floored at 64 MB). What the
machine has is ``MemAvailable`` from /proc/meminfo (physical pages free or reclaimable), or
the free physical pages where that file does not exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mmchat.gguf_meta import read_gguf

KV_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute


def _int(info: object, key: str) -> int | None:
    value = info.get(key)  # type: ignore[attr-defined]
    if isinstance(value, list):  # per-layer arrays (head_count_kv): the largest
        value = max((v for v in value if isinstance(v, int)), default=None)
    return int(value) if isinstance(value, int) else None


def _tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a GGUF (the file minus its header, near enough)."""
    return path.stat().st_size


def estimate(
    model: Path,
    mmproj: Path | None = None,
    *,
    n_ctx: int = 4096,
    kv_type: str = "f16",
    n_batch: int = 512,
) -> MemoryEstimate:
    info = read_gguf(model, role="model")
    arch = info.architecture or "llama"
    n_layer = _int(info, f"{arch}.block_count") or 0
    n_embd = _int(info, f"{arch}.embedding_length") or 0
    n_head = _int(info, f"{arch}.attention.head_count") or 1
    n_head_kv = _int(info, f"{arch}.attention.head_count_kv") or n_head
    k_len = _int(info, f"{arch}.attention.key_length") or (n_embd // max(1, n_head))
    v_len = _int(info, f"{arch}.attention.value_length") or k_len
    n_vocab = _int(info, f"{arch}.vocab_size") or 0
    ctx_train = _int(info, f"{arch}.context_length")
    ctx = min(n_ctx, ctx_train) if ctx_train else n_ctx
    kv = int(n_layer * ctx * n_head_kv * (k_len + v_len) * KV_BYTES.get(kv_type, 2))
    if mmproj is not None:
        kv += _image_kv(info, mmproj, kv_type)
    weights = _tensor_bytes(model) + (_tensor_bytes(mmproj) if mmproj is not None else 0)
    compute = max(64 << 20, 4 * n_batch * (8 * n_embd + n_vocab) + 4 * n_vocab)
    return MemoryEstimate(weights=weights, kv_cache=kv, compute=compute)


IMAGE_SLOTS = 16
"""Images a cross-attention context holds at once (``mmchat.runtime.flamingo``'s default)."""


def _image_kv(info: object, mmproj: Path, kv_type: str) -> int:
    """Bytes of the image keys/values of a cross-attention decoder's gated blocks (0 for a
    decoder without them). The cross-attention decoder keeps f16 or f32 K/V only."""
    widths = [  # ggml order: [n_embd_image, width]
        int(t.shape[-1])
        for t in info.tensors  # type: ignore[attr-defined]
        if t.name.endswith(".xattn_k.weight") and t.shape
    ]
    if not widths:
        return 0
    latents = read_gguf(mmproj, role="projector (mmproj)").tensor("perc.latents")
    rows = int(latents.shape[-1]) if latents is not None and latents.shape else 64  # [W, n]
    per_value = 4 if kv_type == "f32" else 2
    return 2 * sum(widths) * rows * IMAGE_SLOTS * per_value


def available_memory() -> int | None:
    """Bytes of memory a new process can use without swapping (None if unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def summary(est: MemoryEstimate, available: int | None, n_ctx: int) -> str:
    """The same for a table row (``mmchat show``)."""
    text = (
        f"about {_gb(est.total)} (weights {_gb(est.weights)}, context {_gb(est.kv_cache)} at "
        f"{n_ctx} tokens, compute {_gb(est.compute)})"
    )
    if available is None:
        return text
    fits = "" if est.total <= available else ": will not fit in RAM"
    return f"{text}; {_gb(available)} available{fits}"


def describe(est: MemoryEstimate, available: int | None) -> str:
    """One line: what the model needs and what the machine has."""
    need = (
        f"needs about {_gb(est.total)} of memory (weights {_gb(est.weights)}, "
        f"context {_gb(est.kv_cache)}, compute {_gb(est.compute)})"
    )
    if available is None:
        return need
    verdict = "" if est.total <= available else ": it will not fit in RAM (expect swapping)"
    return f"{need}; this machine has {_gb(available)} available{verdict}"
