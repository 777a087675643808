"""`mmchat convert` on LLaVA 1.6 (LLaVA-NeXT) checkpoints: family detection, the anyres
mmproj keys and tensors, loading in llama.cpp's mtmd, and bad pinpoints / newline input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize
from mmchat.converters import convert
from mmchat.converters.checkpoint import open_checkpoint
from mmchat.converters.families import detect_family
from mmchat.converters.families.llava_next import (
    LlavaNextHF,
    LlavaNextLlama,
    LlavaNextMistral,
    parse_pinpoints,
)
from support.models import (
    CLIP_TOWER,
    converted,
    fixture_dir,
    mtmd_encode,
    write_safetensors,
)

from mmchat.errors import UserError

NEXT = ["llava16_hf", "llava16_orig"]


def goldens_meta(fixture: str) -> dict[str, Any]:
    return json.loads((fixture_dir(fixture) / "goldens.json").read_text())


def goldens_npz(fixture: str) -> dict[str, np.ndarray]:
    with np.load(fixture_dir(fixture) / "goldens.npz") as z:
        return {k: z[k] for k in z.files}


def gguf_fields(path: Path) -> dict[str, Any]:
    r = GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    r = GGUFReader(path)
    out = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        out[t.name] = (
            t.tensor_type.name,
            dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32),
        )
    return out


# -- detection -------------------------------------------------------------------------


def test_detection_tells_llava16_from_llava15() -> None:
    hf = json.loads((fixture_dir("llava16_hf") / "config.json").read_text())
    orig = json.loads((fixture_dir("llava16_orig") / "config.json").read_text())
    old = json.loads((fixture_dir("llava15_orig") / "config.json").read_text())
    assert isinstance(detect_family(hf), LlavaNextHF)
    assert isinstance(detect_family(orig), LlavaNextLlama)
    mistral = {**orig, "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral"}
    assert isinstance(detect_family(mistral), LlavaNextMistral)
    assert not isinstance(detect_family(old), (LlavaNextLlama, LlavaNextMistral))
    assert type(detect_family(old)).__name__ == "LlavaLlama"
    # the HF model_type alone (no architectures) is enough
    assert isinstance(detect_family({**hf, "architectures": None}), LlavaNextHF)


def test_parse_pinpoints() -> None:
    kw: dict[str, Any] = {"image_size": 336, "where": "config.json"}
    assert parse_pinpoints([[336, 672], [672, 672]], pair_order="wh", **kw) == [
        (336, 672),
        (672, 672),
    ]
    assert parse_pinpoints([[336, 672]], pair_order="hw", **kw) == [(672, 336)]
    # original LLaVA also accepts the list written as a string
    assert parse_pinpoints("[(336, 1008), (1008, 336)]", pair_order="wh", **kw) == [
        (336, 1008),
        (1008, 336),
    ]
    bad = [
        (None, "has no image_grid_pinpoints"),
        ([], "non-empty list"),
        ("[[336, 672]", "not a list"),
        ("__import__('os')", "not a list"),
        ([[336, 672, 1008]], "pair of positive integers"),
        ([[336, -672]], "pair of positive integers"),
        ([[336.0, 672]], "pair of positive integers"),
        ([[True, 672]], "pair of positive integers"),
        ([[336, 600]], "multiple of the vision tower's image size 336"),
        ({"a": 1}, "non-empty list"),
    ]
    for raw, message in bad:
        with pytest.raises(UserError, match=message):
            parse_pinpoints(raw, pair_order="wh", **kw)


# -- what the converter writes ---------------------------------------------------------


@pytest.mark.parametrize("fixture", NEXT)
def test_mmproj_anyres_metadata(fixture: str) -> None:
    _, mmproj = converted(fixture, "f32", "f32")
    f = gguf_fields(mmproj)
    meta = goldens_meta(fixture)["anyres"]
    # (width, height) pairs in the reference's order of trial: llava-hf's pairs are swapped
    want = [x for pin in meta["candidates_wh"] for x in pin]
    assert [int(x) for x in f["clip.vision.image_grid_pinpoints"]] == want
    if fixture == "llava16_hf":
        cfg = json.loads((fixture_dir(fixture) / "config.json").read_text())
        assert want == [x for h, w in cfg["image_grid_pinpoints"] for x in (w, h)]
    assert f["clip.vision.mm_patch_merge_type"] == "spatial_unpad"
    assert f["mmchat.vision.unpad_rounding"] == meta["unpad_rounding"]
    # everything the LLaVA 1.5 mmproj has
    assert f["clip.projector_type"] == "mlp"
    assert f["clip.vision.image_size"] == meta["image_size"]
    assert f["clip.vision.patch_size"] == meta["patch_size"]
    assert list(f["clip.vision.feature_layer"]) == [f["clip.vision.block_count"] - 1]
    np.testing.assert_allclose(f["clip.vision.image_mean"], meta["image_mean"], rtol=1e-7)
    # the pinpoints are an INT32 array, as llama.cpp's get_arr_int requires
    r = GGUFReader(mmproj)
    fld = r.fields["clip.vision.image_grid_pinpoints"]
    assert fld.types[-1].name == "INT32"


@pytest.mark.parametrize("vquant", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("fixture", NEXT)
def test_mmproj_tensors(fixture: str, vquant: str) -> None:
    _, mmproj = converted(fixture, "f32", vquant)
    got = gguf_tensors(mmproj)
    g = goldens_npz(fixture)
    typ, newline = got["v.image_newline"]
    assert typ == "F32"  # 1-D: never quantized
    assert np.array_equal(newline, g["image_newline"])
    assert "v.post_ln.weight" not in got
    ckpt = open_checkpoint(fixture_dir(fixture))
    if fixture == "llava16_orig":
        # the fine-tuned tower inside the checkpoint, not the one mm_vision_tower names
        src = ckpt[
            "model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight"
        ]
        outside = open_checkpoint(CLIP_TOWER)["vision_model.embeddings.position_embedding.weight"]
        assert not np.array_equal(src.load(), outside.load())
        w0 = ckpt["model.mm_projector.0.weight"].load()
    else:
        src = ckpt["vision_tower.vision_model.embeddings.position_embedding.weight"]
        w0 = ckpt["multi_modal_projector.linear_1.weight"].load()
    typ, pos = got["v.position_embd.weight"]
    want = src.load().astype(np.float32)
    if vquant == "f32":
        assert np.array_equal(pos, want)
        assert np.array_equal(got["mm.0.weight"][1], w0.astype(np.float32))
    else:
        assert np.array_equal(pos, want.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("vquant", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("fixture", NEXT)
def test_mmproj_loads_in_llama_cpp_mtmd(fixture: str, vquant: str) -> None:
    """llama.cpp reads the pinpoints and tiles the image (its approximation: no unpad, no
    newline), so it sees more than one view's tokens for an image larger than a tile."""
    model, mmproj = converted(fixture, "f32", vquant)
    per_view = goldens_meta(fixture)["anyres"]["tokens_per_view"]
    n, emb, _ = mtmd_encode(model, mmproj, 150, 70)
    assert n > per_view and n % per_view == 0
    assert np.isfinite(emb).all() and np.abs(emb).max() > 0


# -- bad input -------------------------------------------------------------------------


def _copy(fixture: str, tmp_path: Path) -> Path:
    dst = tmp_path / fixture
    shutil.copytree(fixture_dir(fixture), dst)
    return dst


def _edit_config(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def _convert_fails(folder: Path, tmp_path: Path, message: str) -> None:
    outdir = tmp_path / "out"
    tower = CLIP_TOWER if "orig" in folder.name else None
    with pytest.raises(UserError, match=message):
        convert(folder, outdir=outdir, quant="f32", vision_quant="f32", vision_tower=tower)
    left = sorted(p.name for p in outdir.iterdir()) if outdir.exists() else []
    assert left == [], f"files left behind: {left}"


@pytest.mark.parametrize("fixture", NEXT)
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (..., "has no image_grid_pinpoints"),
        (None, "has no image_grid_pinpoints"),
        ([], "non-empty list"),
        ([[32, 64, 96]], "pair of positive integers"),
        ([[32, "64"]], "pair of positive integers"),
        ([[33, 66]], "multiple of the vision tower's image size"),
        ("[[32, 64]", "not a list"),
    ],
)
def test_bad_pinpoints_fail_clearly(fixture: str, value: Any, message: str, tmp_path: Path) -> None:
    folder = _copy(fixture, tmp_path)
    _edit_config(folder, image_grid_pinpoints=value)
    _convert_fails(folder, tmp_path, message)


def test_unsupported_merge_types(tmp_path: Path) -> None:
    folder = _copy("llava16_orig", tmp_path)
    _edit_config(folder, mm_patch_merge_type="spatial")
    _convert_fails(folder, tmp_path, "'spatial' with image_aspect_ratio 'anyres' is not supported")
    _edit_config(folder, mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres_max_9")
    _convert_fails(folder, tmp_path, "not supported")


def test_missing_image_newline(tmp_path: Path) -> None:
    folder = _copy("llava16_hf", tmp_path)
    ckpt = open_checkpoint(folder)
    tensors = {n: ckpt[n].load() for n in ckpt.names() if n != "image_newline"}
    (folder / "model.safetensors").unlink()
    write_safetensors(folder / "model.safetensors", tensors)
    _convert_fails(folder, tmp_path, "no image_newline tensor")


def test_wrong_image_newline_width(tmp_path: Path) -> None:
    folder = _copy("llava16_hf", tmp_path)
    ckpt = open_checkpoint(folder)
    tensors = {n: ckpt[n].load() for n in ckpt.names()}
    tensors["image_newline"] = np.zeros(10, np.float32)
    (folder / "model.safetensors").unlink()
    write_safetensors(folder / "model.safetensors", tensors)
    _convert_fails(folder, tmp_path, "image_newline")
