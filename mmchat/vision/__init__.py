"""Images in, LLM-space embeddings out (the vision half of a multimodal model).

Public API (the contract with ``mmchat.runtime``, see docs/ARCHITECTURE.md)::

    img = load_image("photo.jpg")                        # PreparedImage (sha256 digest, RGB)
    eng = open_vision(mmproj, text_n_embd=4096)           # LLaVA -> libmmvision, else mtmd
    emb = eng.encode(img)                                 # ImageEmbedding, cached per image
    emb.embeddings                                        # float32 [n_tokens, n_embd]
"""

from __future__ import annotations

from mmchat.vision.cache import DiskCache, EmbeddingCache, shared_cache
from mmchat.vision.engine import (
    LLAVA_PROJECTORS,
    ImageEmbedding,
    LlavaEngine,
    VisionEngine,
    open_vision,
    read_mmproj_header,
)
from mmchat.vision.image import (
    ImageTooLargeError,
    PreparedImage,
    expand_to_square,
    llava_pixels,
    load_image,
    pad_colour,
)

__all__ = [
    "LLAVA_PROJECTORS",
    "DiskCache",
    "EmbeddingCache",
    "ImageEmbedding",
    "ImageTooLargeError",
    "LlavaEngine",
    "PreparedImage",
    "VisionEngine",
    "expand_to_square",
    "llava_pixels",
    "load_image",
    "open_vision",
    "pad_colour",
    "read_mmproj_header",
    "shared_cache",
]
