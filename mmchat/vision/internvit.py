"""NVLM-D and InternVL vision files (projector type ``internvit``) on libmmvision: dynamic
tiles, tile tags.

Pixels as InternVL's ``load_image`` / ``dynamic_preprocess`` make them: the grid (cols x rows
of 448-px tiles, 1 to ``max_tiles`` tiles) whose aspect ratio is closest to the image's (ties:
the larger grid when the image has more than half its area), the image resized (bicubic) to
that grid and cut into tiles row by row, plus a thumbnail (the whole image resized to one
tile) when there is more than one tile; /255, ImageNet mean/std.

Each tile becomes (448/14/2)^2 = 256 rows (InternViT -> pixel shuffle -> mlp1); the tiles of
all images of one call go through the encoder in one batched call. In the prompt the image
is laid out as NVLM-D was trained::

    <Image><tile_1> rows <tile_2> rows … <tile_global_thumbnail> rows </Image>

(a lone tile is tagged ``<tile_global_thumbnail>``); the tags are tokenized as plain text, each
piece between two blocks of rows on its own (``<Image>`` and the first tag together).
transformers' InternVL (prompt style ``internvl``) wraps all tiles' rows in its special
tokens instead: ``<img>`` rows … ``</img>``.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mmchat.errors import CorruptFileError, UserError
from mmchat.gguf_meta import read_gguf
from mmchat.vision.cache import EmbeddingCache
from mmchat.vision.engine import ImageEmbedding, VisionEngine
from mmchat.vision.image import PreparedImage
from mmchat.vision.layout import EmbedSpan, Layout, TextSpan

PROJECTOR = "internvit"
Tokenize = Callable[[str], list[int]]


# --- InternVL's dynamic_preprocess ----------------------------------------------------------


def target_grid(
    width: int, height: int, min_tiles: int, max_tiles: int, size: int
) -> tuple[int, int]:
    """(columns, rows) of tiles, exactly as InternVL's ``find_closest_aspect_ratio`` picks
    them (including its candidate order: a set of ratios sorted by tile count)."""
    ratios = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    aspect = width / height
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for cols, rows in sorted(ratios, key=lambda r: r[0] * r[1]):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    return best


def tiles_of(
    image: Image.Image, *, min_tiles: int, max_tiles: int, size: int, use_thumbnail: bool
) -> tuple[list[Image.Image], tuple[int, int]]:
    """The tiles (+ thumbnail) of one RGB image and its grid."""
    cols, rows = target_grid(image.width, image.height, min_tiles, max_tiles, size)
    resized = image.resize((size * cols, size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for i in range(cols * rows):
        x, y = (i % cols) * size, (i // cols) * size
        tiles.append(resized.crop((x, y, x + size, y + size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size), Image.Resampling.BICUBIC))
    return tiles, (cols, rows)


def tile_tags(n_tiles: int) -> list[str]:
    """NVLM-D's tag before each tile's rows."""
    return [f"<tile_{i}>" for i in range(1, n_tiles)] + ["<tile_global_thumbnail>"]


# internvit.prompt_style values: NVLM-D tile tags (plain text), InternVL <img>…</img> (special)
STYLES = ("nvlm", "internvl")


def wrapper_pieces(style: str, n_tiles: int) -> list[str]:
    """The text before each tile's rows, then the text after the last."""
    if style == "nvlm":
        tags = tile_tags(n_tiles)
        return ["<Image>" + tags[0], *tags[1:], "</Image>"]
    return ["<img>", *([""] * (n_tiles - 1)), "</img>"]


def _llama_tokenizer(llama_model: int, *, special: bool) -> Tokenize:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(ctypes.c_void_p(llama_model))

    def tokenize(text: str) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, cap, False, special)
        if n < 0:
            raise UserError(f"cannot tokenize the tile tag {text!r}")
        return [int(buf[i]) for i in range(n)]

    return tokenize


class InternVitEngine(VisionEngine):
    """An ``internvit`` vision GGUF (NVLM-D) on libmmvision."""

    kind = "mmvision"

    def __init__(
        self,
        mmproj: Path,
        *,
        text_n_embd: int | None,
        llama_model: int | None = None,
        tokenize: Tokenize | None = None,
        n_threads: int | None = None,
        device: str | None = None,
        max_batch: int = 8,
        fast_math: bool = False,
        cache: EmbeddingCache | None = None,
        disk_cache: bool | Path = False,
    ) -> None:
        from mmchat.vision.engine import open_native_vision

        if fast_math:  # f16 K/V in attention, tanh GELU: not exact, a cache of its own
            self.kind = "mmvision-fast"
        if tokenize is None and not llama_model:  # rows without tag layouts: cached apart
            self.kind += "-rows"
        super().__init__(mmproj, cache=cache, disk_cache=disk_cache)
        meta = read_gguf(mmproj, role="projector (mmproj)")
        self.min_tiles = int(meta.get("internvit.tiling.min_tiles", 1))
        self.max_tiles = int(meta.get("internvit.tiling.max_tiles", 6))
        self.use_thumbnail = bool(meta.get("internvit.tiling.use_thumbnail", True))
        style = str(meta.get("internvit.prompt_style", "nvlm"))
        if style not in STYLES:
            raise UserError(f"{mmproj.name}: prompt style {style!r} is not supported (nvlm)")
        self.style = style
        # NVLM-D's chat() writes "<image>\n" per image: a newline between two images
        self.image_separator = "\n" if style == "nvlm" else ""
        if not 1 <= self.min_tiles <= self.max_tiles <= 40:
            raise CorruptFileError(f"{mmproj}: tile bounds {self.min_tiles}..{self.max_tiles}")
        if tokenize is None and llama_model:
            # NVLM-D's tags are plain text; InternVL's <img>, </img> are special tokens
            tokenize = _llama_tokenizer(llama_model, special=style == "internvl")
        self._tokenize = tokenize
        self._tag_ids: dict[str, tuple[int, ...]] = {}
        self.model = open_native_vision(
            mmproj,
            device=device,
            n_threads=n_threads,
            expected_n_embd=text_n_embd,
            max_batch=max_batch,
            fast_math=fast_math,
        )
        info = self.model.info
        if info.projector_type != PROJECTOR:
            self.model.close()
            raise UserError(f"{mmproj.name} is a '{info.projector_type}' projector, not InternViT")
        self.info = info
        self.projector_type = info.projector_type
        self.n_embd = info.n_embd
        self.image_size = info.image_size
        self.device = info.device

    # -- tiling and layout ------------------------------------------------------------------
    def grid(self, image: PreparedImage) -> tuple[int, int]:
        """(columns, rows) of 448-px tiles for this image (the thumbnail not counted)."""
        return target_grid(
            image.width, image.height, self.min_tiles, self.max_tiles, self.image_size
        )

    def n_tiles(self, image: PreparedImage) -> int:
        cols, rows = self.grid(image)
        n = cols * rows
        return n + 1 if self.use_thumbnail and n > 1 else n

    def describe(self, image: PreparedImage) -> str:
        """The tile grid in words, e.g. ``2×1 tiles + thumbnail``."""
        cols, rows = self.grid(image)
        thumb = " + thumbnail" if self.use_thumbnail and cols * rows > 1 else ""
        return f"{cols}×{rows} tile{'s' if cols * rows > 1 else ''}{thumb}"

    def tokens_for(self, image: PreparedImage) -> int:
        return self.n_tiles(image) * self.info.n_tokens

    def _ids(self, text: str) -> tuple[int, ...]:
        if not text:
            return ()
        if text not in self._tag_ids:
            if self._tokenize is None:
                raise UserError(
                    "the NVLM-D engine needs the text model's tokenizer to lay out tile tags"
                )
            self._tag_ids[text] = tuple(self._tokenize(text))
        return self._tag_ids[text]

    def layout(self, image: PreparedImage) -> Layout:
        pieces = wrapper_pieces(self.style, self.n_tiles(image))
        block = EmbedSpan(self.info.n_tokens)
        out: list[TextSpan | EmbedSpan] = []
        for i, piece in enumerate(pieces):
            if i + 1 == len(pieces) and self.style == "nvlm" and piece:
                # NVLM-D's processor tokenizes "</Image>" with the text after it (Qwen2's
                # BPE merges ">\n"): the runtime does the same with this span's text
                out.append(TextSpan((), text=piece))
                continue
            ids = self._ids(piece)
            if ids:
                out.append(TextSpan(ids))
            if i + 1 < len(pieces):
                out.append(block)
        return tuple(out)

    def tile_pixels(self, image: PreparedImage) -> np.ndarray:
        """float32 [n_tiles, 3, S, S]: every tile (and the thumbnail) of one image."""
        img = image.image if image.image.mode == "RGB" else image.image.convert("RGB")
        tiles, _ = tiles_of(
            img,
            min_tiles=self.min_tiles,
            max_tiles=self.max_tiles,
            size=self.image_size,
            use_thumbnail=self.use_thumbnail,
        )
        mean = np.asarray(self.info.image_mean, dtype=np.float32)
        std = np.asarray(self.info.image_std, dtype=np.float32)
        out = np.empty((len(tiles), 3, self.image_size, self.image_size), dtype=np.float32)
        for i, tile in enumerate(tiles):
            a = np.asarray(tile, dtype=np.float32) / np.float32(255.0)
            out[i] = ((a - mean) / std).transpose(2, 0, 1)
        return out

    def _encode_batch(self, images: Sequence[PreparedImage]) -> list[ImageEmbedding]:
        from mmchat.native import NativeError

        t0 = time.perf_counter()
        layouts = [self.layout(img) if self._tokenize is not None else () for img in images]
        per_image = [self.tile_pixels(img) for img in images]
        try:  # every tile of every image in one call (batched max_batch at a time)
            rows = self.model.encode(np.concatenate(per_image))
        except NativeError as exc:
            raise UserError(f"Image encoding failed: {exc}") from None
        ms = (time.perf_counter() - t0) * 1000.0 / len(images)
        out: list[ImageEmbedding] = []
        start = 0
        for img, px, lay in zip(images, per_image, layouts, strict=True):
            n = px.shape[0]
            emb = np.ascontiguousarray(rows[start : start + n].reshape(-1, rows.shape[-1]))
            start += n
            out.append(ImageEmbedding(digest=img.digest, embeddings=emb, layout=lay, encode_ms=ms))
        return out

    def _close(self) -> None:
        self.model.close()
