"""mmchat.vision.anyres against the LLaVA 1.6 goldens (numpy only: recorded per-view
features stand in for the encoder)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mmchat.vision import load_image
from mmchat.vision.anyres import (
    AnyresSpec,
    assemble,
    encode,
    encode_many,
    n_tokens,
    pixels,
    plan,
    select_best_resolution,
)
from mmchat.vision.synthetic import rel_l2

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHECKPOINTS = ("llava16_hf", "llava16_orig")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@cache
def goldens(ckpt: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    meta = json.loads((FIXTURES / ckpt / "goldens.json").read_text())
    with np.load(FIXTURES / ckpt / "goldens.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


def spec_of(ckpt: str, *, rounding: str | None = None, swap: bool = False) -> AnyresSpec:
    a = goldens(ckpt)[0]["anyres"]
    pins = tuple((w, h) for w, h in a["candidates_wh"])
    if swap:  # the other reference's reading of the same config list
        pins = tuple((h, w) for w, h in pins)
    return AnyresSpec(
        image_size=a["image_size"],
        patch_size=a["patch_size"],
        pinpoints=pins,
        image_mean=tuple(a["image_mean"]),
        image_std=tuple(a["image_std"]),
        unpad_rounding=rounding or a["unpad_rounding"],
    )


def items(ckpt: str) -> list[dict[str, Any]]:
    return list(goldens(ckpt)[0]["anyres"]["items"])


CASES = [(c, it["name"]) for c in CHECKPOINTS for it in items(c)]


def item(ckpt: str, name: str) -> dict[str, Any]:
    return next(it for it in items(ckpt) if it["name"] == name)


@pytest.mark.parametrize(("ckpt", "name"), CASES)
def test_layout_matches_reference(ckpt: str, name: str) -> None:
    it = item(ckpt, name)
    layout = plan(spec_of(ckpt), tuple(it["size_wh"]))
    assert list(layout.resolution) == it["best_resolution_wh"]
    assert list(layout.grid) == it["grid_cols_rows"]
    assert list(layout.kept) == it["unpadded_rows_cols"]
    assert layout.n_views == it["n_views"]
    assert layout.n_tokens == it["n_tokens"] == n_tokens(spec_of(ckpt), tuple(it["size_wh"]))


@pytest.mark.parametrize(("ckpt", "name"), CASES)
def test_other_reference_conventions(ckpt: str, name: str) -> None:
    """Swapping the pinpoint pairs / the rounding reproduces what the other reference does."""
    it = item(ckpt, name)
    other = it["other_convention"]
    size = tuple(it["size_wh"])
    swapped = plan(spec_of(ckpt, swap=True), size)
    assert list(swapped.resolution) == other["best_resolution_wh"]
    rounding = "round7" if spec_of(ckpt).unpad_rounding == "truncate" else "truncate"
    assert (
        list(plan(spec_of(ckpt, rounding=rounding), size).kept)
        == (other["unpadded_rows_cols_with_other_rounding"])
    )


def test_fixtures_cover_both_differences() -> None:
    for ckpt in CHECKPOINTS:
        conv = [it["other_convention"] for it in items(ckpt)]
        assert any(c["differs"] for c in conv), ckpt
        assert any(c["rounding_differs"] for c in conv), ckpt


@pytest.mark.parametrize(("ckpt", "name"), CASES)
def test_pixels_match_reference(ckpt: str, name: str) -> None:
    _, arrays = goldens(ckpt)
    it = item(ckpt, name)
    img = load_image(FIXTURES / it["file"])
    layout, px = pixels(img, spec_of(ckpt))
    want = arrays[it["keys"]["pixels"]]
    assert px.dtype == np.float32 and px.flags.c_contiguous
    assert px.shape == want.shape
    assert float(np.abs(px - want).max()) <= 1e-5
    assert layout.n_views == px.shape[0]


@pytest.mark.parametrize(("ckpt", "name"), CASES)
def test_assemble_matches_reference(ckpt: str, name: str) -> None:
    _, arrays = goldens(ckpt)
    it = item(ckpt, name)
    layout = plan(spec_of(ckpt), tuple(it["size_wh"]))
    out = assemble(arrays[it["keys"]["tile_embeds"]], layout, arrays["image_newline"])
    want = arrays[it["keys"]["embeds"]]
    assert out.shape == want.shape and out.dtype == np.float32 and out.flags.c_contiguous
    assert rel_l2(out, want) <= 1e-6


class RecordedEncoder:
    """Test double for the vision encoder: returns the goldens' per-view embeddings for
    views it recognises by their pixels, and records every call."""

    def __init__(self, ckpt: str) -> None:
        _, arrays = goldens(ckpt)
        self.table: list[tuple[np.ndarray, np.ndarray]] = []
        for it in items(ckpt):
            px, emb = arrays[it["keys"]["pixels"]], arrays[it["keys"]["tile_embeds"]]
            self.table += list(zip(px, emb, strict=True))
        self.calls: list[int] = []

    def __call__(self, batch: list[np.ndarray]) -> np.ndarray:
        self.calls.append(len(batch))
        out = []
        for view in batch:
            out.append(next(e for p, e in self.table if float(np.abs(p - view).max()) <= 1e-5))
        return np.stack(out)


@pytest.mark.parametrize("ckpt", CHECKPOINTS)
def test_encode_end_to_end_with_a_recorded_encoder(ckpt: str) -> None:
    _, arrays = goldens(ckpt)
    enc = RecordedEncoder(ckpt)
    for it in items(ckpt)[:4]:
        img = load_image(FIXTURES / it["file"])
        out = encode(img, spec_of(ckpt), arrays["image_newline"], enc)
        assert rel_l2(out, arrays[it["keys"]["embeds"]]) <= 1e-6
    assert enc.calls == [it["n_views"] for it in items(ckpt)[:4]]


@pytest.mark.parametrize("ckpt", CHECKPOINTS)
def test_encode_many_batches_all_views_in_one_call(ckpt: str) -> None:
    _, arrays = goldens(ckpt)
    enc = RecordedEncoder(ckpt)
    chosen = items(ckpt)
    imgs = [load_image(FIXTURES / it["file"]) for it in chosen]
    outs = encode_many(imgs, spec_of(ckpt), arrays["image_newline"], enc)
    assert enc.calls == [sum(it["n_views"] for it in chosen)]
    for it, out in zip(chosen, outs, strict=True):
        assert out.shape[0] == it["n_tokens"]
        assert rel_l2(out, arrays[it["keys"]["embeds"]]) <= 1e-6
    assert encode_many([], spec_of(ckpt), arrays["image_newline"], enc) == []


def llava16_336(rounding: str = "truncate") -> AnyresSpec:
    """The real LLaVA 1.6 settings (CLIP ViT-L/14-336, the hub's pinpoints)."""
    return AnyresSpec.from_flat(
        [336, 672, 672, 336, 672, 672, 1008, 336, 336, 1008],
        image_size=336,
        patch_size=14,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        unpad_rounding=rounding,
    )


def test_real_model_token_counts() -> None:
    spec = llava16_336()
    assert spec.tokens_per_view == 576
    assert n_tokens(spec, (672, 672)) == 576 + 48 * 49 == 2928  # the "~2,900"
    assert spec.max_tokens == 2928
    # 800x600 goes onto 672x672: 48 columns, 36 rows of image (6 padding rows cut each side)
    layout = plan(spec, (800, 600))
    assert layout.resolution == (672, 672) and layout.kept == (36, 48)
    assert layout.n_tokens == 576 + 36 * 49
    # a panorama goes onto 1008x336
    assert plan(spec, (3000, 900)).grid == (3, 1)
    # the float effect of the unpad rounding at full size: 656x205 on 672x336 keeps
    # 14 feature rows when truncating (original LLaVA), 16 when rounding (transformers)
    assert plan(spec, (656, 205)).kept == (14, 48)
    assert plan(llava16_336("round7"), (656, 205)).kept == (16, 48)


def test_best_resolution_ties_go_to_the_first_pinpoint() -> None:
    assert select_best_resolution((10, 10), [(32, 64), (64, 32)]) == (32, 64)
    assert select_best_resolution((10, 10), [(64, 32), (32, 64)]) == (64, 32)
    # more pixels kept beats less padding
    assert select_best_resolution((100, 100), [(32, 64), (64, 64)]) == (64, 64)
    with pytest.raises(ValueError, match="no pixels"):
        select_best_resolution((0, 5), [(32, 32)])


@pytest.mark.parametrize("size", [(1, 1), (1, 500), (500, 1), (31, 97), (333, 334), (2000, 17)])
def test_any_size_gives_consistent_shapes(size: tuple[int, int]) -> None:
    spec = spec_of("llava16_hf")
    img = Image.new("RGB", size, (10, 200, 30))
    layout, px = pixels(img, spec)
    assert px.shape == (layout.n_views, 3, spec.image_size, spec.image_size)
    d = 8
    fake = np.arange(layout.n_views * spec.tokens_per_view * d, dtype=np.float32)
    out = assemble(fake.reshape(layout.n_views, spec.tokens_per_view, d), layout, np.full(d, -1.0))
    assert out.shape == (layout.n_tokens, d)
    r, c = layout.kept
    # every row of the grid ends with the newline, and nothing else is the newline
    assert int((out[:, 0] == -1.0).sum()) == r
    assert 0 <= r <= layout.grid[1] * spec.side and 0 <= c <= layout.grid[0] * spec.side


def test_assemble_rejects_wrong_shapes() -> None:
    spec = spec_of("llava16_hf")
    layout = plan(spec, (64, 40))
    good = np.zeros((layout.n_views, spec.tokens_per_view, 4), np.float32)
    with pytest.raises(ValueError, match="views"):
        assemble(good[:-1], layout, np.zeros(4))
    with pytest.raises(ValueError, match="image_newline"):
        assemble(good, layout, np.zeros(5))

    def bad_encoder(batch: list[np.ndarray]) -> np.ndarray:
        return np.zeros((len(batch) - 1, spec.tokens_per_view, 4), np.float32)

    with pytest.raises(ValueError, match="encode_batch returned"):
        encode(Image.new("RGB", (64, 40)), spec, np.zeros(4), bad_encoder)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pinpoints": ()}, "at least one"),
        ({"pinpoints": ((32, 48),)}, "multiples"),
        ({"pinpoints": ((32, 0),)}, "multiples"),
        ({"pinpoints": ((32,),)}, "multiples"),
        ({"image_size": 30}, "patch size"),
        ({"unpad_rounding": "floor"}, "unpad rounding"),
    ],
)
def test_spec_validation(kwargs: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {
        "image_size": 32,
        "patch_size": 8,
        "pinpoints": ((32, 64),),
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    }
    with pytest.raises(ValueError, match=message):
        AnyresSpec(**{**base, **kwargs})
    with pytest.raises(ValueError, match="pairs"):
        AnyresSpec.from_flat(
            [32, 64, 32], image_size=32, patch_size=8, image_mean=CLIP_MEAN, image_std=CLIP_STD
        )
