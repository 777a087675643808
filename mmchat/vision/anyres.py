"""LLaVA 1.6 ("LLaVA-NeXT") "anyres" image handling, exactly as the reference models do it.

An image becomes several encoder views: the whole image squashed to the encoder's square
size (the *base* view) plus the tiles of a larger canvas chosen from the model's grid
pinpoints. Each view is encoded on its own (CLIP + projector, by the caller's
``encode_batch``); the tile features are put back into one grid, the rows and columns that
only hold padding are cut off ("unpad"), a learned ``image_newline`` embedding ends every
row, and the base view's tokens go first::

    spec = AnyresSpec(image_size=336, patch_size=14, pinpoints=((336, 672), ...), ...)
    layout = plan(spec, (width, height))           # canvas, grid, kept rows/cols, n_tokens
    emb = encode(image, spec, newline, encode_batch)  # float32 [layout.n_tokens, n_embd]

Two references exist and differ in two details; ``AnyresSpec`` carries both choices:

* ``pinpoints`` are (width, height) pairs *in the order the reference tries them*. Original
  LLaVA reads its config's pairs as (width, height), transformers as (height, width); ties
  go to the first candidate, so the order matters (a converter swaps llava-hf pairs).
* ``unpad_rounding``: original LLaVA truncates ``int(h * (W / w))`` ("truncate");
  transformers rounds to 7 decimals first ("round7"). They differ for a few image sizes
  (e.g. 656x205 on a 672x336 canvas keeps two feature rows fewer when truncating).

Pure numpy and Pillow: nothing here knows about ggml, so tests can feed recorded features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmchat.errors import CorruptFileError, UserError
from mmchat.vision.image import PreparedImage

UNPAD_ROUNDINGS = ("truncate", "round7")
# mmproj keys (llama.cpp's names, plus mmchat's record of the reference's unpad rounding)
KEY_PINPOINTS = "clip.vision.image_grid_pinpoints"
KEY_MERGE = "clip.vision.mm_patch_merge_type"
KEY_ROUNDING = "mmchat.vision.unpad_rounding"
NEWLINE_TENSORS = ("v.image_newline", "model.image_newline")  # ours / older llama.cpp files

EncodeBatch = Callable[[list[np.ndarray]], np.ndarray]
"""``encode_batch(views)``: a list of float32 [3, S, S] views -> float32 [n, P, n_embd]."""


@dataclass(frozen=True)
class AnyresSpec:
    """What a LLaVA 1.6 model's anyres needs to know (read from its mmproj)."""

    image_size: int
    """The encoder's square input size S (one view)."""
    patch_size: int
    pinpoints: tuple[tuple[int, int], ...]
    """Candidate canvases as (width, height), in the order the reference tries them."""
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    unpad_rounding: str = "truncate"

    def __post_init__(self) -> None:
        s, p = self.image_size, self.patch_size
        if s <= 0 or p <= 0 or s % p:
            raise ValueError(f"image size {s} is not a positive multiple of the patch size {p}")
        if not self.pinpoints:
            raise ValueError("anyres needs at least one grid pinpoint")
        for pin in self.pinpoints:
            if len(pin) != 2 or any(int(x) != x or x <= 0 or x % s for x in pin):
                raise ValueError(
                    f"grid pinpoint {list(pin)} is not a pair of positive multiples of the "
                    f"image size {s}"
                )
        if self.unpad_rounding not in UNPAD_ROUNDINGS:
            raise ValueError(
                f"unpad rounding {self.unpad_rounding!r}: use one of {', '.join(UNPAD_ROUNDINGS)}"
            )

    @classmethod
    def from_flat(
        cls,
        flat: Sequence[int],
        *,
        image_size: int,
        patch_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        unpad_rounding: str = "truncate",
    ) -> AnyresSpec:
        """From a GGUF ``clip.vision.image_grid_pinpoints`` list: w0, h0, w1, h1, …"""
        values = [int(x) for x in flat]
        if len(values) % 2:
            raise ValueError(f"grid pinpoints must come in (width, height) pairs, got {values}")
        m, d = (float(x) for x in image_mean), (float(x) for x in image_std)
        return cls(
            image_size=int(image_size),
            patch_size=int(patch_size),
            pinpoints=tuple((values[i], values[i + 1]) for i in range(0, len(values), 2)),
            image_mean=(next(m), next(m), next(m)),
            image_std=(next(d), next(d), next(d)),
            unpad_rounding=unpad_rounding,
        )

    @property
    def side(self) -> int:
        """Features per view side (S / patch)."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_view(self) -> int:
        return self.side * self.side

    @property
    def max_tokens(self) -> int:
        """Tokens for the worst case: a canvas as large as the largest pinpoint, unpadded."""
        s = self.side
        return self.tokens_per_view + max(
            (h // self.image_size * s) * (w // self.image_size * s + 1) for w, h in self.pinpoints
        )


@dataclass(frozen=True)
class AnyresLayout:
    """How one image of a given size is split and merged."""

    size: tuple[int, int]
    """The image's (width, height)."""
    resolution: tuple[int, int]
    """The chosen canvas (width, height)."""
    grid: tuple[int, int]
    """Tiles (columns, rows)."""
    rows: tuple[int, int]
    """Rows [start, stop) of the tile feature grid that are kept."""
    cols: tuple[int, int]
    """Columns [start, stop) that are kept."""
    tokens_per_view: int

    @property
    def n_views(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    @property
    def kept(self) -> tuple[int, int]:
        """(rows, columns) of the feature grid after unpadding."""
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]

    @property
    def n_tokens(self) -> int:
        r, c = self.kept
        return self.tokens_per_view + r * (c + 1)


def select_best_resolution(
    size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The canvas that keeps most of the image's pixels once it is fitted inside; ties go to
    the one with least padding, then to the earlier pinpoint."""
    w0, h0 = size
    if w0 <= 0 or h0 <= 0:
        raise ValueError(f"image size {w0}x{h0} has no pixels")
    best = pinpoints[0]
    best_kept, best_waste = -1, math.inf
    for w, h in pinpoints:
        scale = min(w / w0, h / h0)
        kept = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        waste = w * h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (w, h), kept, waste
    return best


def _cut(x: float, rounding: str) -> int:
    return int(round(x, 7)) if rounding == "round7" else int(x)


def plan(spec: AnyresSpec, size: tuple[int, int]) -> AnyresLayout:
    """The layout of an image of ``size`` = (width, height)."""
    w0, h0 = int(size[0]), int(size[1])
    res = select_best_resolution((w0, h0), spec.pinpoints)
    cols, rows = res[0] // spec.image_size, res[1] // spec.image_size
    gw, gh = cols * spec.side, rows * spec.side
    if w0 / h0 > gw / gh:  # wider than the grid: padding rows above and below
        pad = (gh - _cut(h0 * (gw / w0), spec.unpad_rounding)) // 2
        r, c = (pad, gh - pad), (0, gw)
    else:
        pad = (gw - _cut(w0 * (gh / h0), spec.unpad_rounding)) // 2
        r, c = (0, gh), (pad, gw - pad)
    return AnyresLayout((w0, h0), res, (cols, rows), r, c, spec.tokens_per_view)


def n_tokens(spec: AnyresSpec, size: tuple[int, int]) -> int:
    """Embedding rows an image of ``size`` = (width, height) becomes."""
    return plan(spec, size).n_tokens


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Bicubic resize to fit ``target`` (ceil on the side that does not fill it), centred on
    black."""
    w0, h0 = image.size
    tw, th = target
    sw, sh = tw / w0, th / h0
    if sw < sh:
        nw, nh = tw, min(math.ceil(h0 * sw), th)
    else:
        nw, nh = min(math.ceil(w0 * sh), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), Image.Resampling.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def _rgb(image: PreparedImage | Image.Image) -> Image.Image:
    img = image.image if isinstance(image, PreparedImage) else image
    return img if img.mode == "RGB" else img.convert("RGB")


def views(
    image: PreparedImage | Image.Image, spec: AnyresSpec
) -> tuple[AnyresLayout, list[Image.Image]]:
    """The layout and the views to encode: the base view, then the tiles row by row."""
    img = _rgb(image)
    layout = plan(spec, img.size)
    s = spec.image_size
    canvas = resize_and_pad(img, layout.resolution)
    tiles = [
        canvas.crop((x, y, x + s, y + s))
        for y in range(0, layout.resolution[1], s)
        for x in range(0, layout.resolution[0], s)
    ]
    return layout, [img.resize((s, s), Image.Resampling.BICUBIC), *tiles]


def normalise(view: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB view -> float32 [3, S, S]: x/255, then (x-mean)/std (computed in float64)."""
    a = np.asarray(view, dtype=np.float64) / 255.0
    a = (a - np.asarray(mean, dtype=np.float64)) / np.asarray(std, dtype=np.float64)
    return np.ascontiguousarray(a.transpose(2, 0, 1)).astype(np.float32)


def pixels(image: PreparedImage | Image.Image, spec: AnyresSpec) -> tuple[AnyresLayout, np.ndarray]:
    """The layout and the normalised views, float32 [n_views, 3, S, S] (base first)."""
    layout, vs = views(image, spec)
    return layout, np.stack([normalise(v, spec.image_mean, spec.image_std) for v in vs])


def assemble(view_embeds: np.ndarray, layout: AnyresLayout, newline: np.ndarray) -> np.ndarray:
    """Merge per-view embeddings [n_views, P, D] into the LLM's [n_tokens, D]: base view,
    then the unpadded tile grid row by row, ``newline`` after each row."""
    e = np.asarray(view_embeds, dtype=np.float32)
    cols, rows = layout.grid
    side = math.isqrt(layout.tokens_per_view)
    if e.ndim != 3 or e.shape[0] != layout.n_views or e.shape[1] != layout.tokens_per_view:
        raise ValueError(
            f"expected embeddings of {layout.n_views} views x {layout.tokens_per_view} tokens, "
            f"got shape {list(e.shape)}"
        )
    d = e.shape[2]
    nl = np.asarray(newline, dtype=np.float32).reshape(-1)
    if nl.shape[0] != d:
        raise ValueError(f"image_newline has width {nl.shape[0]}, the embeddings {d}")
    grid = e[1:].reshape(rows, cols, side, side, d).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * side, cols * side, d)
    grid = grid[layout.rows[0] : layout.rows[1], layout.cols[0] : layout.cols[1]]
    kr, kc = layout.kept
    out = np.empty((layout.n_tokens, d), dtype=np.float32)
    out[: layout.tokens_per_view] = e[0]
    body = out[layout.tokens_per_view :].reshape(kr, kc + 1, d)
    body[:, :kc] = grid
    body[:, kc] = nl
    return out


def encode_many(
    images: Sequence[PreparedImage | Image.Image],
    spec: AnyresSpec,
    newline: np.ndarray,
    encode_batch: EncodeBatch,
) -> list[np.ndarray]:
    """Embeddings of several images; all their views go to ``encode_batch`` in one call."""
    prepared = [pixels(img, spec) for img in images]
    flat = [v for _, px in prepared for v in px]
    if not flat:
        return []
    out = np.asarray(encode_batch(flat))
    if out.ndim != 3 or out.shape[0] != len(flat):
        raise ValueError(f"encode_batch returned shape {list(out.shape)} for {len(flat)} views")
    result: list[np.ndarray] = []
    start = 0
    for layout, px in prepared:
        result.append(assemble(out[start : start + len(px)], layout, newline))
        start += len(px)
    return result


def encode(
    image: PreparedImage | Image.Image,
    spec: AnyresSpec,
    newline: np.ndarray,
    encode_batch: EncodeBatch,
) -> np.ndarray:
    """The LLM-space embeddings of one image, float32 [n_tokens, n_embd]."""
    return encode_many([image], spec, newline, encode_batch)[0]


def load_anyres(
    mmproj: str | Path,
    *,
    image_size: int,
    patch_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    n_embd: int,
) -> tuple[AnyresSpec, np.ndarray] | None:
    """The anyres settings and ``image_newline`` [n_embd] of an mmproj, or None when it has
    no grid pinpoints (a LLaVA 1.5-style file: one view per image).

    ``CorruptFileError`` for pinpoints without the learned newline or with malformed values;
    ``UserError`` for a merge type other than LLaVA 1.6's ``spatial_unpad``."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(mmproj)
    reader = GGUFReader(path, "r")
    try:
        fld = reader.fields.get(KEY_PINPOINTS)
        if fld is None:
            return None
        flat = [int(x) for x in fld.contents()]
        merge_fld = reader.fields.get(KEY_MERGE)
        merge = str(merge_fld.contents()) if merge_fld is not None else "flat"
        if merge != "spatial_unpad":
            raise UserError(
                f"{path.name} has grid pinpoints with mm_patch_merge_type {merge!r}; only "
                "LLaVA 1.6's 'spatial_unpad' is supported"
            )
        rnd_fld = reader.fields.get(KEY_ROUNDING)
        rounding = str(rnd_fld.contents()) if rnd_fld is not None else "truncate"
        tensor = next((t for t in reader.tensors if t.name in NEWLINE_TENSORS), None)
        if tensor is None:
            raise CorruptFileError(
                f"{path.name} has grid pinpoints (LLaVA 1.6) but no v.image_newline tensor"
            )
        newline = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        newline = np.ascontiguousarray(newline.reshape(-1)).copy()
    finally:
        del reader
    if newline.shape[0] != n_embd:
        raise CorruptFileError(
            f"{path.name}: v.image_newline has {newline.shape[0]} values, the projector "
            f"outputs {n_embd}"
        )
    try:
        spec = AnyresSpec.from_flat(
            flat,
            image_size=image_size,
            patch_size=patch_size,
            image_mean=image_mean,
            image_std=image_std,
            unpad_rounding=rounding,
        )
    except ValueError as exc:
        raise CorruptFileError(f"{path.name}: {exc}") from None
    return spec, newline
