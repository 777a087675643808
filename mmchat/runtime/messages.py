"""Chat messages and their plain-data form (for ``/save``, ``/open`` and the HTTP API)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmchat.errors import UserError

ROLES = ("system", "user", "assistant")

# What a message may carry as an image:
# - a ``mmchat.vision.PreparedImage`` (encoded by the vision engine when needed);
# - a ``mmchat.vision.ImageEmbedding`` (already encoded);
# - a float32 ``np.ndarray`` of shape (n_tokens, n_embd) (embeddings computed elsewhere,
#   e.g. the transformers goldens in the parity tests).
ImageInput = Any


def image_key(image: ImageInput) -> str:
    """A stable identity for an image: its sha256 (of the file bytes, or of raw embeddings)."""
    if isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image, dtype=np.float32)
        return "emb-" + hashlib.sha256(arr.tobytes()).hexdigest()
    digest = getattr(image, "digest", None)
    if not digest:
        raise TypeError(f"not an image: {type(image).__name__}")
    return str(digest)


@dataclass
class Message:
    role: str
    content: str = ""
    images: list[ImageInput] = field(default_factory=list)
    interrupted: bool = False
    """An assistant reply that was cut short (the consumer stopped reading it)."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise UserError(f"unknown message role {self.role!r} (use {', '.join(ROLES)})")
        self.images = list(self.images)

    @classmethod
    def coerce(cls, value: Message | Mapping[str, Any]) -> Message:
        """Accept a Message or a ``{"role", "content", "images"}`` mapping."""
        if isinstance(value, Message):
            return value
        content = value.get("content", "")
        if content is None:
            content = ""
        return cls(
            role=str(value.get("role", "")),
            content=str(content),
            images=list(value.get("images") or ()),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.images:
            out["images"] = [image_ref(img) for img in self.images]
        if self.interrupted:
            out["interrupted"] = True
        return out


def image_ref(image: ImageInput) -> dict[str, Any]:
    """Plain data naming an image: its sha256 and, when known, where it came from."""
    ref: dict[str, Any] = {"sha256": image_key(image)}
    for attr in ("source", "width", "height"):
        value = getattr(image, attr, None)
        if value is not None:
            ref[attr] = value
    return ref


ImageLoader = Callable[[str], Any]


def _default_loader(source: str) -> Any:
    from mmchat.vision import load_image

    return load_image(source)


def messages_from_data(
    data: Sequence[Mapping[str, Any]],
    *,
    load_image: ImageLoader | None = None,
    base_dir: Path | None = None,
) -> list[Message]:
    """Rebuild messages saved with ``Message.to_dict``; images are re-read from their path.

    An image whose file is gone or whose bytes changed (sha256 differs) is a UserError:
    the conversation would otherwise silently talk about a different picture.
    """
    loader = load_image or _default_loader
    out: list[Message] = []
    for i, raw in enumerate(data):
        if not isinstance(raw, Mapping):
            raise UserError(f"message {i + 1} is not an object")
        images: list[ImageInput] = []
        for ref in raw.get("images") or ():
            if not isinstance(ref, Mapping) or not ref.get("source"):
                raise UserError(f"message {i + 1}: an image has no source path")
            source = str(ref["source"])
            path = Path(source).expanduser()
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            img = loader(str(path))
            want = ref.get("sha256")
            if want and image_key(img) != want:
                raise UserError(f"image {source} has changed since the conversation was saved")
            images.append(img)
        msg = Message(
            role=str(raw.get("role", "")),
            content=str(raw.get("content") or ""),
            images=images,
            interrupted=bool(raw.get("interrupted", False)),
        )
        out.append(msg)
    return out
