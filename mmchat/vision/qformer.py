"""BLIP-2 / InstructBLIP vision files (projector type ``qformer``) on libmmvision.

The engine returns the rows the language model receives: EVA ViT -> ln_vision -> Q-Former
(learned queries; InstructBLIP also reads the instruction) -> language projection, one block
of ``n_query`` rows per image. Pixels as transformers' ``BlipImageProcessor`` makes them:
RGB, bicubic resize straight to the square input size (no padding, no crop), /255, the
file's mean/std.

InstructBLIP's rows depend on the instruction (the text of the message that carries the
image): ``encode(image, prompt)`` tokenizes it with the Q-Former's own WordPiece vocabulary
(stored in the vision GGUF) and the cache key is (image, instruction); ``bind(image, prompt)``
gives the image the runtime passes instead (its digest is that key, it carries the
instruction). BLIP-2's and MiniGPT-4's rows depend on the image only; ``prompt`` is ignored.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmchat.errors import CorruptFileError, UserError
from mmchat.gguf_meta import read_gguf
from mmchat.vision.cache import EmbeddingCache
from mmchat.vision.engine import ImageEmbedding, VisionEngine
from mmchat.vision.image import PreparedImage
from mmchat.vision.wordpiece import WordPiece

PROJECTOR = "qformer"
PROJECTORS = ("qformer", "eva_concat")
"""The vision files this engine runs: BLIP-2 / InstructBLIP / MiniGPT-4 (``qformer``) and
MiniGPT-v2 (``eva_concat``, EVA rows concatenated 4 at a time: no Q-Former, no instruction)."""


def blip_pixels(
    image: PreparedImage | Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """float32 [3, size, size] as BlipImageProcessor: bicubic resize, /255, normalise."""
    img = image.image if isinstance(image, PreparedImage) else image
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    a = np.asarray(img, dtype=np.float64) / 255.0
    a = (a - np.asarray(mean, dtype=np.float64)) / np.asarray(std, dtype=np.float64)
    return np.ascontiguousarray(a.transpose(2, 0, 1)).astype(np.float32)


def instruction_key(digest: str, instruction: str) -> str:
    """Cache key of an InstructBLIP image: the image bytes' sha256 and the instruction."""
    return hashlib.sha256(f"{digest}\0{instruction}".encode()).hexdigest()


@dataclass(frozen=True, eq=False)
class InstructedImage(PreparedImage):
    """An image bound to the instruction the Q-Former reads with it (``QformerEngine.bind``):
    its ``digest`` is ``instruction_key(image_digest, instruction)``, so every cache keyed by
    digest (the engine's, the runtime's prompt cache) tells two instructions apart."""

    image_digest: str = ""
    instruction: str = ""


def _string_array(path: Path, key: str) -> list[str]:
    """A (long) string array from a GGUF header; read_gguf summarises long arrays."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
        fld = reader.get_field(key)
        return [] if fld is None else [str(v) for v in fld.contents()]
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"Cannot read {key} from {path}: {exc}") from exc


def _tokenizer_from(mmproj: Path) -> tuple[WordPiece | None, int]:
    info = read_gguf(mmproj, role="projector (mmproj)")
    if not info.get("qformer.text_input", False):
        return None, 0
    tokens = _string_array(mmproj, "qformer.tokenizer.tokens")
    if not tokens:
        raise CorruptFileError(
            f"{mmproj} reads an instruction but holds no qformer.tokenizer.tokens vocabulary"
        )
    wp = WordPiece(
        tokens,
        do_lower_case=bool(info.get("qformer.tokenizer.do_lower_case", True)),
        unk=str(info.get("qformer.tokenizer.unk_token", "[UNK]")),
        cls=str(info.get("qformer.tokenizer.cls_token", "[CLS]")),
        sep=str(info.get("qformer.tokenizer.sep_token", "[SEP]")),
    )
    return wp, int(info.get("qformer.text.max_length", 128))


class QformerEngine(VisionEngine):
    """A ``qformer`` vision GGUF (BLIP-2, InstructBLIP) on libmmvision."""

    kind = "mmvision"

    def __init__(
        self,
        mmproj: Path,
        *,
        text_n_embd: int | None,
        n_threads: int | None = None,
        device: str | None = None,
        max_batch: int = 4,
        cache: EmbeddingCache | None = None,
        disk_cache: bool | Path = False,
    ) -> None:
        from mmchat.vision.engine import open_native_vision

        super().__init__(mmproj, cache=cache, disk_cache=disk_cache)
        self.tokenizer, self.max_text = _tokenizer_from(mmproj)
        self.model = open_native_vision(
            mmproj,
            device=device,
            n_threads=n_threads,
            expected_n_embd=text_n_embd,
            max_batch=max_batch,
        )
        info = self.model.info
        if info.projector_type not in PROJECTORS:
            self.model.close()
            raise UserError(
                f"{mmproj.name} is a '{info.projector_type}' projector, not one of {PROJECTORS}"
            )
        if info.text_input != (self.tokenizer is not None):
            self.model.close()
            raise CorruptFileError(f"{mmproj}: qformer.text_input disagrees with its tensors")
        self.info = info
        self.projector_type = info.projector_type
        self.n_embd = info.n_embd
        self.image_size = info.image_size
        self.device = info.device
        self._tokens: dict[str, list[int]] = {}  # cache key -> instruction token ids

    @property
    def reads_instruction(self) -> bool:
        """InstructBLIP: the rows depend on the instruction given to ``encode``."""
        return self.tokenizer is not None

    def tokens_for(self, image: PreparedImage) -> int:
        return self.info.n_tokens

    def pixels(self, image: PreparedImage) -> np.ndarray:
        return blip_pixels(image, self.info.image_size, self.info.image_mean, self.info.image_std)

    def instruction_ids(self, prompt: str) -> list[int]:
        """The Q-Former's token ids of an instruction ([CLS] … [SEP], left-truncated)."""
        if self.tokenizer is None:
            raise UserError("this model's Q-Former reads no instruction")
        return self.tokenizer.encode(prompt, max_length=min(self.max_text, self.info.n_text_max))

    def bind(self, image: PreparedImage, instruction: str) -> PreparedImage:
        """``image`` as the runtime should pass it for a message with text ``instruction``
        (InstructBLIP: an ``InstructedImage``; BLIP-2: ``image`` itself)."""
        if self.tokenizer is None:
            return image
        return self._bind(image, instruction)

    @staticmethod
    def _bind(image: PreparedImage, instruction: str) -> InstructedImage:
        base = image.image_digest if isinstance(image, InstructedImage) else image.digest
        return InstructedImage(
            digest=instruction_key(base, instruction),
            width=image.width,
            height=image.height,
            source=image.source,
            image=image.image,
            image_digest=base,
            instruction=instruction,
        )

    def encode(self, image: PreparedImage, prompt: str | None = None) -> ImageEmbedding:
        """The rows the LLM receives for ``image``; for InstructBLIP ``prompt`` is the
        instruction the Q-Former reads (required), cached per (image, instruction)."""
        return self.encode_many([image], prompts=None if prompt is None else [prompt])[0]

    def encode_many(
        self, images: Sequence[PreparedImage], prompts: Sequence[str] | None = None
    ) -> list[ImageEmbedding]:
        if self.tokenizer is None:
            return super().encode_many(images)
        if prompts is None:
            unbound = [img for img in images if not isinstance(img, InstructedImage)]
            if unbound:
                raise UserError(
                    "InstructBLIP's image rows depend on the instruction: the vision engine "
                    "needs the text of the message that carries the image (encode(image, "
                    "prompt), or an image from bind(image, prompt))"
                )
            bound = [img for img in images if isinstance(img, InstructedImage)]
        else:
            if len(prompts) != len(images):
                raise ValueError("one prompt per image")
            bound = [self._bind(img, p) for img, p in zip(images, prompts, strict=True)]
        keyed: list[PreparedImage] = []
        with self._lock:
            for b in bound:
                self._tokens[b.digest] = self.instruction_ids(b.instruction)
                keyed.append(b)
            try:
                return super().encode_many(keyed)
            finally:
                for k in keyed:
                    self._tokens.pop(k.digest, None)

    def _encode_batch(self, images: Sequence[PreparedImage]) -> list[ImageEmbedding]:
        from mmchat.native import NativeError

        t0 = time.perf_counter()
        out: dict[int, np.ndarray] = {}
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            ids = tuple(self._tokens[img.digest]) if self.tokenizer is not None else ()
            groups.setdefault(ids, []).append(i)
        try:
            for ids, idx in groups.items():
                px = np.stack([self.pixels(images[i]) for i in idx])
                rows = self.model.encode(px, list(ids) if ids else None)
                for j, i in enumerate(idx):
                    out[i] = np.ascontiguousarray(rows[j])
        except NativeError as exc:
            raise UserError(f"Image encoding failed: {exc}") from None
        ms = (time.perf_counter() - t0) * 1000.0 / len(images)
        return [
            ImageEmbedding(digest=img.digest, embeddings=out[i], encode_ms=ms)
            for i, img in enumerate(images)
        ]

    def _close(self) -> None:
        self.model.close()
