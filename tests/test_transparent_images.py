"""Transparent images are composited onto white (issue 22), for every model and engine.

Goldens (``tests/fixtures/images_transparent``, ``make_issue22_fixtures.py``): what
transformers' ``convert_to_rgb`` makes of each file (the RGB every transformers image
processor feeds its model), and the logits of the transformers-5 Vicuna LLaVA 1.6 with each
image (``tests/fixtures/llava16_vicuna_t5``).
"""

from __future__ import annotations

import ctypes
import io
import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mmchat.vision import llava_pixels, load_image
from mmchat.vision.image import composite_on_white, has_transparency

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TRANSPARENT = FIXTURES / "images_transparent"
VICUNA = FIXTURES / "llava16_vicuna_t5"
NAMES = ["rgba", "la", "palette", "palette_alpha", "gray_trns", "rgb_trns"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@cache
def goldens(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(folder / "goldens.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads((folder / "goldens.json").read_text())


def item(name: str) -> dict[str, Any]:
    return next(it for it in goldens(TRANSPARENT)[1]["items"] if it["name"] == name)


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


# -- pixels --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_pixels_equal_transformers_convert_to_rgb(name: str) -> None:
    g, _ = goldens(TRANSPARENT)
    it = item(name)
    with Image.open(FIXTURES / it["file"]) as im:
        assert im.mode == it["mode"] and has_transparency(im)
    img = load_image(FIXTURES / it["file"])
    got = np.asarray(img.image)
    assert img.image.mode == "RGB" and (img.width, img.height) == tuple(it["size_wh"])
    np.testing.assert_array_equal(got, g[it["keys"]["rgb"]])
    # and not what dropping the alpha gives (the colours hidden under it)
    assert np.abs(got.astype(int) - g[it["keys"]["rgb_plain"]].astype(int)).mean() > 5


def test_pa_image_in_memory_is_composited_too() -> None:
    """PA (no file format stores it; Pillow makes it from P) through the preprocessing
    entry point that takes a Pillow image."""
    g, _ = goldens(TRANSPARENT)
    with Image.open(TRANSPARENT / "palette_alpha.png") as im:
        pa = im.convert("PA")
    assert pa.mode == "PA" and has_transparency(pa)
    want = g["palette_alpha.rgb"]
    np.testing.assert_array_equal(np.asarray(composite_on_white(pa)), want)
    np.testing.assert_array_equal(
        llava_pixels(pa, 32, CLIP_MEAN, CLIP_STD),
        llava_pixels(Image.fromarray(want, "RGB"), 32, CLIP_MEAN, CLIP_STD),
    )


@pytest.mark.parametrize(
    ("mode", "colour", "want"),
    [
        ("RGBA", (10, 200, 30, 0), (255, 255, 255)),
        ("RGBA", (10, 200, 30, 255), (10, 200, 30)),
        ("LA", (0, 128), (127, 127, 127)),  # half-transparent black over white
        ("RGB", (10, 200, 30), (10, 200, 30)),
    ],
)
def test_compositing_rule(mode: str, colour: Any, want: tuple[int, int, int]) -> None:
    buf = io.BytesIO()
    Image.new(mode, (3, 2), colour).save(buf, format="PNG")
    rgb = np.asarray(load_image(buf.getvalue()).image)
    assert (rgb == np.asarray(want, dtype=np.uint8)).all(), rgb[0, 0]


def test_exif_orientation_is_kept_with_transparency() -> None:
    """The EXIF orientation still applies to a transparent PNG (compositing drops EXIF, so
    load_image orients first)."""
    g, _ = goldens(TRANSPARENT)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    with Image.open(TRANSPARENT / "rgba.png") as im:
        im.save(buf, format="PNG", exif=exif.tobytes())
    got = np.asarray(load_image(buf.getvalue()).image)
    np.testing.assert_array_equal(got, np.rot90(g["rgba.rgb"], -1))


# -- engines and the chat path ------------------------------------------------------------


class TextModel:
    """A bare llama_model* (what mtmd needs next to the mmproj)."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        from mmchat.runtime._llama import ensure_backend

        ensure_backend(False)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self.ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self.ptr, f"cannot load {path}"
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.ptr))
        self.address = int(ctypes.cast(self.ptr, ctypes.c_void_p).value or 0)

    def close(self) -> None:
        import llama_cpp

        llama_cpp.llama_model_free(self.ptr)


@pytest.mark.parametrize(
    ("fixture", "engine"),
    [
        ("llava15_hf", "mmvision"),
        ("llava15_hf", "mtmd"),
        ("llava15_orig", "mmvision"),
        ("llava15_orig", "mtmd"),
        ("llava16_vicuna_t5", "mmvision"),  # mtmd: LLaVA 1.6 image chunks not supported
    ],
)
def test_every_engine_sees_the_composited_image(fixture: str, engine: str) -> None:
    """Each engine encodes a transparent file exactly as the opaque PNG of its composite."""
    pytest.importorskip("llama_cpp")
    from support.models import converted

    from mmchat.vision import EmbeddingCache, open_vision

    g, _ = goldens(TRANSPARENT)
    model, mmproj = converted(fixture)
    tm = TextModel(model)
    try:
        eng = open_vision(
            mmproj,
            text_n_embd=tm.n_embd,
            llama_model=tm.address if engine == "mtmd" else None,
            engine=engine,
            device="cpu",
            cache=EmbeddingCache(),
        )
        try:
            for name in ("rgba", "palette"):
                a = eng.encode(load_image(TRANSPARENT / f"{name}.png")).embeddings
                b = eng.encode(load_image(png_bytes(g[f"{name}.rgb"]))).embeddings
                np.testing.assert_array_equal(a, b)
        finally:
            eng.close()
    finally:
        tm.close()


@pytest.mark.parametrize("fixture", ["llava15_hf", "bakllava_hf", "llava15_orig"])
def test_llava15_pixels_and_features_match_the_reference(fixture: str) -> None:
    """LLaVA 1.5 (original LLaVA's pad-to-square preprocessing) on the composite: pixels
    and image features against transformers' composite + the fixture's reference model, for
    the transparent set and the fixtures' own rgba.png / palette.png (whose rows in the
    committed LLaVA 1.5 goldens were made with the alpha dropped)."""
    pytest.importorskip("llama_cpp")
    from support.models import converted

    from mmchat.vision import EmbeddingCache, open_vision
    from mmchat.vision.engine import LlavaEngine
    from mmchat.vision.synthetic import rel_l2

    g = dict(np.load(TRANSPARENT / "llava15_goldens.npz"))
    meta = json.loads((TRANSPARENT / "llava15_goldens.json").read_text())["fixtures"][fixture]
    model, mmproj = converted(fixture)
    tm = TextModel(model)
    rows = []
    try:
        eng = open_vision(mmproj, text_n_embd=tm.n_embd, device="cpu", cache=EmbeddingCache())
        assert isinstance(eng, LlavaEngine)
        try:
            for it in meta["items"]:
                img = load_image(FIXTURES / it["file"])
                np.testing.assert_allclose(eng.pixels(img), g[it["pixels"]], rtol=0, atol=1e-6)
                err = rel_l2(eng.encode(img).embeddings, g[it["embeds"]])
                rows.append((it["file"], err))
        finally:
            eng.close()
    finally:
        tm.close()
    print(f"\n{fixture} (f32 mmproj): image features rel L2 vs reference")
    for f, err in rows:
        print(f"  {f:40s} {err:.2e}")
    assert all(err <= 1e-3 for _, err in rows), rows


@pytest.fixture(scope="module")
def vicuna_model() -> Any:
    pytest.importorskip("llama_cpp")
    from support.models import converted

    from mmchat.runtime import LoadOptions, load_model

    model, mmproj = converted("llava16_vicuna_t5")
    lm = load_model(model, mmproj, LoadOptions.parity(n_threads=2, vision_device="cpu"))
    yield lm
    lm.close()


@pytest.mark.parametrize("name", NAMES)
def test_chat_path_logits_match_transformers(name: str, vicuna_model: Any) -> None:
    """``evaluate(messages)`` with a transparent image: transformers' processor composites
    onto white, and so do we -> its image features and final logits."""
    from mmchat.runtime.messages import Message
    from mmchat.vision.synthetic import rel_l2

    g, meta = goldens(VICUNA)
    c = next(c for c in meta["chats"] if c["key"] == f"chat.transparent_{name}")
    (m,) = c["messages"]
    msg = Message(role="user", content=m["content"], images=[load_image(FIXTURES / m["images"][0])])
    ev = vicuna_model.evaluate([msg])
    (emb,) = ev.image_embeddings
    e_img = rel_l2(emb, g[f"{c['key']}.image_embeds"])
    err = rel_l2(ev.logits, g[f"{c['key']}.logits"])
    print(f"\n{name}: image features rel L2 {e_img:.2e}, final logits rel L2 {err:.2e}")
    assert e_img <= 1e-3 and err <= 2e-3
    assert int(np.argmax(ev.logits)) == c["top1"]
