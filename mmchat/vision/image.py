"""Loading images (any file Pillow reads) and LLaVA's preprocessing.

``load_image`` turns a path or bytes into an RGB ``PreparedImage`` identified by the sha256 of
its bytes; every way it can fail is a one-line ``UserError``. A transparent image (an alpha
channel, or a palette / grey / RGB image with a transparent colour) is composited onto white
first, as image viewers show it and as transformers' processors (``convert_to_rgb``) prepare
it, for every model and engine (docs/images.md). ``llava_pixels`` prepares it the
way original LLaVA does ("pad" aspect ratio): pad to a square with the mean colour, bicubic
resize to the encoder's size, scale to [0, 1], normalise with the file's mean/std, CHW.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmchat.errors import CorruptFileError, NotFoundError, UserError
from mmchat.settings import load_settings


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """An image ready for a vision engine: RGB, EXIF orientation applied."""

    digest: str
    """sha256 (hex) of the image file's bytes: the cache key."""
    width: int
    height: int
    source: str
    """Where it came from (a path, or ``<N bytes>``), for messages."""
    image: Image.Image

    def __repr__(self) -> str:
        return (
            f"PreparedImage(digest={self.digest[:12]}…, {self.width}x{self.height}, "
            f"source={self.source!r})"
        )


class ImageTooLargeError(UserError):
    """The image has more pixels than the configured limit (decompression-bomb guard)."""


def _read_source(source: str | Path | bytes | bytearray | memoryview) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return data, f"<{len(data)} bytes>"
    path = Path(source).expanduser()
    label = str(path)
    if not path.exists():
        raise NotFoundError(f"No such image file: {label}")
    if path.is_dir():
        raise UserError(f"{label} is a folder, not an image")
    try:
        return path.read_bytes(), label
    except OSError as exc:
        raise UserError(f"Cannot read image {label}: {exc.strerror or exc}") from exc


WHITE = (255, 255, 255, 255)
_HIGH_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def has_transparency(im: Image.Image) -> bool:
    """An alpha band (RGBA, LA, PA) or a transparent colour (``info["transparency"]``: P, L,
    RGB): what transformers' ``convert_to_rgb`` composites."""
    return "A" in im.getbands() or im.info.get("transparency") is not None


def composite_on_white(im: Image.Image) -> Image.Image:
    """Straight-alpha "over" onto opaque white, 8-bit RGB: Pillow's ``alpha_composite``, the
    operation transformers' ``convert_to_rgb`` uses, so the pixels are identical to its."""
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB (16-bit and float greys are scaled, not clipped);
    transparent images are composited onto white (``composite_on_white``)."""
    if im.mode == "RGB" and not has_transparency(im):
        return im
    if im.mode not in _HIGH_BIT and has_transparency(im):
        return composite_on_white(im)
    if im.mode in _HIGH_BIT:  # a transparent colour in these is not honoured
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            hi = 1.0 if a.size and float(np.nanmax(a)) <= 1.0 else 255.0
        elif im.mode == "I" and a.size and float(a.max()) <= 255.0:
            hi = 255.0
        else:
            hi = 65535.0
        a = np.clip(np.nan_to_num(a) * (255.0 / hi), 0.0, 255.0)
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def load_image(
    source: str | Path | bytes | bytearray | memoryview, *, max_pixels: int | None = None
) -> PreparedImage:
    """Read, decode, EXIF-orient and convert an image to RGB.

    Transparency is resolved first of all the pixel work, for every engine: RGBA, LA, PA,
    and P / L / RGB images with a transparent colour are composited onto white (what a
    viewer shows, and what transformers' image processors feed the model), not stripped of
    their alpha (which would show whatever colour the transparent pixels happen to hold).
    EXIF orientation is applied before that, which gives the same pixels (both act per
    pixel / by position) and keeps the EXIF data that compositing would drop.

    ``max_pixels`` (default ``MMCHAT_MAX_IMAGE_PIXELS``) rejects images whose header announces
    more pixels, before anything is decoded. Raises ``UserError`` (one line) for a missing,
    empty, truncated, non-image or too-large input.
    """
    data, label = _read_source(source)
    if not data:
        raise CorruptFileError(f"{label} is empty, not an image")
    limit = load_settings().max_image_pixels if max_pixels is None else max_pixels
    digest = hashlib.sha256(data).hexdigest()
    with warnings.catch_warnings():
        # our own limit replaces Pillow's global decompression-bomb threshold
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im: Image.Image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise CorruptFileError(
                f"{label} is not an image Pillow can read (PNG, JPEG, GIF, WebP, BMP, TIFF …)"
            ) from None
        except Image.DecompressionBombError:
            raise ImageTooLargeError(
                f"{label} is too large to open safely (raise MMCHAT_MAX_IMAGE_PIXELS)"
            ) from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise CorruptFileError(f"{label} is a damaged image: {exc}") from None
        w, h = im.size
        if w <= 0 or h <= 0:
            raise CorruptFileError(f"{label} has no pixels ({w}x{h})")
        if limit > 0 and w * h > limit:
            raise ImageTooLargeError(
                f"{label} has {w}x{h} = {w * h:,} pixels, more than the limit of {limit:,} "
                "(MMCHAT_MAX_IMAGE_PIXELS)"
            )
        try:
            im.load()
            im = ImageOps.exif_transpose(im) or im
            rgb = _to_rgb(im)
        except Image.DecompressionBombError:
            raise ImageTooLargeError(
                f"{label} is too large to decode safely (raise MMCHAT_MAX_IMAGE_PIXELS)"
            ) from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "truncated" in msg.lower():
                raise CorruptFileError(f"{label} is truncated (incomplete image file)") from None
            raise CorruptFileError(f"{label} is a damaged image: {msg}") from None
    return PreparedImage(digest=digest, width=rgb.width, height=rgb.height, source=label, image=rgb)


def pad_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """Original LLaVA's background: ``tuple(int(x * 255) for x in image_mean)``."""
    r, g, b = (int(255 * float(m)) for m in mean)
    return (r, g, b)


def expand_to_square(img: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: centre the image on a square of ``colour``."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new("RGB", (side, side), colour)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def clip_crop_pixels(
    image: PreparedImage | Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """Pixels as transformers' CLIPImageProcessor prepares them (NeMo NeVA's
    ``image_aspect_ratio: square``): bicubic resize of the short side to ``size`` (the long
    side ``int(size * long / short)``), centre crop to ``size`` x ``size``, float32
    [3, size, size]."""
    img = image.image if isinstance(image, PreparedImage) else image
    if img.mode != "RGB":
        img = _to_rgb(img)
    w, h = img.size
    short, long = min(w, h), max(w, h)
    if short != size:
        new_long = int(size * long / short)
        new = (size, new_long) if w <= h else (new_long, size)
        img = img.resize(new, Image.Resampling.BICUBIC)
    w, h = img.size
    top, left = (h - size) // 2, (w - size) // 2
    img = img.crop((left, top, left + size, top + size))
    a = np.asarray(img, dtype=np.float64) / 255.0
    a = (a - np.asarray(mean, dtype=np.float64)) / np.asarray(std, dtype=np.float64)
    return np.ascontiguousarray(a.transpose(2, 0, 1)).astype(np.float32)


def llava_pixels(
    image: PreparedImage | Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """Pixels as original LLaVA prepares them: float32 [3, size, size]."""
    img = image.image if isinstance(image, PreparedImage) else image
    if img.mode != "RGB":
        img = _to_rgb(img)
    img = expand_to_square(img, pad_colour(mean))
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    a = np.asarray(img, dtype=np.float64) / 255.0
    a = (a - np.asarray(mean, dtype=np.float64)) / np.asarray(std, dtype=np.float64)
    return np.ascontiguousarray(a.transpose(2, 0, 1)).astype(np.float32)
