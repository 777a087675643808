"""Image loading: every mode to RGB, EXIF orientation, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmchat.errors import CorruptFileError, NotFoundError, UserError
from mmchat.vision import ImageTooLargeError, llava_pixels, load_image, pad_colour

IMAGES = Path(__file__).resolve().parent / "fixtures" / "images"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("landscape.png", (64, 40)),
        ("portrait.png", (40, 64)),
        ("pixel.png", (1, 1)),
        ("large.png", (1200, 700)),
        ("rgba.png", (48, 36)),
        ("palette.png", (50, 30)),
        ("gray.jpg", (56, 42)),
        ("exif_rotated.jpg", (40, 64)),  # stored 64x40 with Orientation=6
        ("cmyk.jpg", (40, 40)),
    ],
)
def test_fixture_images_load_as_rgb(name: str, size: tuple[int, int]) -> None:
    path = IMAGES / name
    if not path.is_file():
        pytest.skip(f"{name} not generated yet")
    img = load_image(path)
    assert img.image.mode == "RGB"
    assert (img.width, img.height) == size == img.image.size
    data = path.read_bytes()
    assert img.digest == hashlib.sha256(data).hexdigest()
    assert img.source == str(path)
    same = load_image(data)
    assert same.digest == img.digest and same.source == f"<{len(data)} bytes>"
    assert np.array_equal(np.asarray(same.image), np.asarray(img.image))
    px = llava_pixels(img, 32, CLIP_MEAN, CLIP_STD)
    assert px.shape == (3, 32, 32) and px.dtype == np.float32 and px.flags.c_contiguous


def test_path_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a b.png").write_bytes(_png(Image.new("RGB", (3, 2), (1, 2, 3))))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_image("~/a b.png").width == 3
    assert load_image(tmp_path / "a b.png").height == 2
    assert load_image(bytearray(_png(Image.new("RGB", (2, 2))))).width == 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("RGBA", (5, 4), (10, 20, 30, 0)),
        lambda: Image.new("LA", (5, 4), (100, 50)),
        lambda: Image.new("L", (5, 4), 77),
        lambda: Image.new("1", (5, 4), 1),
        lambda: Image.new("P", (5, 4), 3),
        lambda: Image.new("CMYK", (5, 4), (0, 255, 0, 0)),
        lambda: Image.new("YCbCr", (5, 4), (128, 128, 128)),
    ],
)
def test_any_mode_becomes_rgb(make: object, tmp_path: Path) -> None:
    src = make()  # type: ignore[operator]
    fmt = "TIFF" if src.mode in ("CMYK", "YCbCr", "LA") else "PNG"
    buf = io.BytesIO()
    src.save(buf, format=fmt)
    img = load_image(buf.getvalue())
    assert img.image.mode == "RGB" and img.image.size == (5, 4)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    a = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    src = Image.fromarray(a)
    assert src.mode.startswith("I;16")
    img = load_image(_png(src))
    rgb = np.asarray(img.image)
    assert rgb.shape == (1, 4, 3)
    assert list(rgb[0, :, 0]) == [0, 1, 128, 255]


def test_float_and_int32_images() -> None:
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    buf = io.BytesIO()
    f.save(buf, format="TIFF")
    assert list(np.asarray(load_image(buf.getvalue()).image)[0, :, 1]) == [0, 128, 255]


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = load_image(buf.getvalue())
    r, g, _ = np.asarray(img.image)[0, 0]
    assert r > 200 and g < 50


def test_exif_orientation_is_applied() -> None:
    src = Image.new("RGB", (6, 2), (0, 0, 0))
    src.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    src.save(buf, format="PNG", exif=exif.tobytes())
    img = load_image(buf.getvalue())
    assert img.image.size == (2, 6)
    assert np.asarray(img.image)[0, 1].min() > 200  # top-left went to top-right


def test_missing_folder_empty(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as e:
        load_image(tmp_path / "nope.png")
    assert "No such image file" in _one_line(e)
    with pytest.raises(UserError) as e:
        load_image(tmp_path)
    assert "folder" in _one_line(e)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(CorruptFileError) as e:
        load_image(tmp_path / "empty.png")
    assert "empty" in _one_line(e)
    with pytest.raises(CorruptFileError):
        load_image(b"")


def test_not_an_image(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("hello, this is text\n" * 20)
    with pytest.raises(CorruptFileError) as e:
        load_image(p)
    assert "not an image" in _one_line(e)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_images(fmt: str, keep: float) -> None:
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    src.save(buf, format=fmt)
    data = buf.getvalue()
    with pytest.raises(CorruptFileError) as e:
        load_image(data[: int(len(data) * keep)])
    msg = _one_line(e)
    assert "truncated" in msg or "damaged" in msg


def test_pixel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _png(Image.new("RGB", (64, 40)))
    with pytest.raises(ImageTooLargeError) as e:
        load_image(data, max_pixels=1000)
    assert "2,560 pixels" in _one_line(e) and "1,000" in str(e.value)
    monkeypatch.setenv("MMCHAT_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(ImageTooLargeError):
        load_image(data)
    assert load_image(data, max_pixels=0).width == 64  # 0 = no limit


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20_000, 100_000])
def test_decompression_bomb_rejected_before_decoding(side: int) -> None:
    with pytest.raises(ImageTooLargeError) as e:
        load_image(_png_header_only(side, side))
    assert "MMCHAT_MAX_IMAGE_PIXELS" in _one_line(e)


def test_pad_colour_and_square_padding() -> None:
    assert pad_colour(CLIP_MEAN) == (122, 116, 104)
    assert pad_colour((0.5, 0.5, 0.5)) == (127, 127, 127)
    wide = Image.new("RGB", (8, 2), (255, 255, 255))
    px = llava_pixels(wide, 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    # the image is centred on a square of the (black) mean colour: rows 3-4 white
    assert np.allclose(px[:, 3:5, :], 1.0) and np.allclose(px[:, :2, :], 0.0)
