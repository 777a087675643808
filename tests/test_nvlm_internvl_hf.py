"""transformers' own InternVL (``InternVLForConditionalGeneration``, InternVL3-*-hf layout) on
the NVLM-D path (projector type ``internvit``, prompt style ``internvl``): convert the tiny
fixture (tests/fixtures/nvlm/internvl_hf, made by make_internvl_hf_fixtures.py) and check rows
and final logits against transformers' own forward."""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmchat.errors import UserError
from mmchat.vision.image import load_image
from mmchat.vision.layout import EmbedSpan, TextSpan
from mmchat.vision.synthetic import rel_l2

ROOT = Path(__file__).parent / "fixtures" / "nvlm"
SRC = ROOT / "internvl_hf"


@cache
def goldens() -> tuple[dict[str, Any], Any]:
    return (
        json.loads((ROOT / "goldens_internvl_hf.json").read_text()),
        np.load(ROOT / "goldens_internvl_hf.npz"),
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from mmchat.converters import convert

    r = convert(SRC, outdir=tmp_path_factory.mktemp("ivhf"), quant="f32", vision_quant="f32")
    return r.model_path, r.mmproj_path


def test_reference_port_equals_transformers_internvl_vision() -> None:
    """Recorded when the fixtures were made: the NVLM-D torch port (with dummy heads) against
    transformers' InternVLVisionModel and pixel_shuffle given the same weights."""
    meta, _ = goldens()
    assert meta["reference_check"]["vision_tower"] < 1e-5
    assert meta["reference_check"]["pixel_shuffle"] == 0.0
    for info in meta["images"].values():  # our PIL tiles = transformers' processor's
        assert info["hf_processor_tiles"] == info["n_tiles"]


def test_conversion_layout(files: tuple[Path, Path]) -> None:
    from mmchat.gguf_meta import read_gguf

    text, mmproj = files
    assert read_gguf(text).architecture == "qwen2"
    v = read_gguf(mmproj)
    assert v.get("clip.projector_type") == "internvit"
    assert v.get("internvit.prompt_style") == "internvl"
    assert v.get("internvit.norm_type") == "layer_norm" and v.get("internvit.qk_norm") is False
    assert v.get("internvit.tiling.max_tiles") == 12
    assert v.tensor("v.blk.0.attn_q.bias") is not None and v.tensor("mm.up.bias") is not None


def test_rows_and_logits_match_transformers(files: tuple[Path, Path]) -> None:
    from mmchat.runtime import LoadOptions, load_model

    meta, g = goldens()
    text, mmproj = files
    with load_model(text, mmproj, LoadOptions.parity(n_threads=2)) as lm:
        print("\nInternVL-hf f32: rows / logits, rel L2 vs transformers")
        for name, info in meta["images"].items():
            img = load_image(ROOT / "images" / f"{name}.png")
            lay = lm.vision.layout(img)
            assert isinstance(lay[0], TextSpan) and isinstance(lay[-1], TextSpan)
            assert sum(isinstance(s, EmbedSpan) for s in lay) == info["n_tiles"]
            rows = lm.vision.encode(img).embeddings
            ev = lm.evaluate([{"role": "user", "content": meta["question"], "images": [img]}])
            assert ev.token_ids == info["text_ids"]
            er, el = rel_l2(rows, g[f"{name}/rows"]), rel_l2(ev.logits, g[f"{name}/logits"])
            print(f"  {name:9s} {lm.vision.describe(img)}: rows {er:.2e} logits {el:.2e}")
            assert er <= 2e-3 and el <= 2e-3, name
            assert int(np.argmax(ev.logits)) == int(np.argmax(g[f"{name}/logits"]))


def test_llama_language_model_is_refused(tmp_path: Path) -> None:
    from mmchat.converters import convert

    src = tmp_path / "src"
    shutil.copytree(SRC, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="Qwen2") as exc:
        convert(src, outdir=tmp_path / "out", quant="f32", vision_quant="f32")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
