"""Converted text GGUFs run through llama.cpp reproduce transformers' logits (fixture goldens),
and the GGUF tokenizer reproduces the checkpoint's SentencePiece tokenization."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.models import LlamaText, converted, fixture_dir

from mmchat.vision.synthetic import rel_l2

FIXTURES = ["llava15_hf", "bakllava_hf", "llava15_orig", "bakllava_orig"]


def needs_torch(fixture: str) -> Any:
    """bakllava_orig is a pytorch_model.bin: it converts only where torch is installed."""
    if fixture != "bakllava_orig":
        return fixture
    try:
        import torch  # noqa: F401

        have = True
    except ImportError:
        have = False
    return pytest.param(
        fixture, marks=pytest.mark.skipif(not have, reason="reading .bin checkpoints needs torch")
    )


ALL = [needs_torch(f) for f in FIXTURES]


@cache
def goldens(fixture: str) -> tuple[dict[str, Any], Any]:
    d = fixture_dir(fixture)
    meta = json.loads((d / "goldens.json").read_text(encoding="utf-8"))
    return meta, np.load(d / "goldens.npz")


def text_cases(fixture: str) -> list[tuple[str, list[int], np.ndarray]]:
    meta, arrays = goldens(fixture)
    return [
        (
            t["key"],
            [int(x) for x in arrays[t["key"] + ".ids"]],
            arrays[t["key"] + ".logits"].astype(np.float64),
        )
        for t in meta["text"]
    ]


LIMITS = {"f32": 1e-3, "f16": 3e-3}


@pytest.mark.parametrize("quant", ["f32", "f16"])
@pytest.mark.parametrize("fixture", ALL)
def test_text_logits_match_transformers(fixture: str, quant: str) -> None:
    model, _ = converted(fixture, quant, "f32")
    worst = 0.0
    with LlamaText(model) as llm:
        for key, ids, ref in text_cases(fixture):
            got = llm.last_logits(ids)
            err = rel_l2(got, ref)
            worst = max(worst, err)
            assert err <= LIMITS[quant], f"{fixture} {quant} {key}: relative L2 {err:.2e}"
            assert int(got.argmax()) == int(ref.argmax()), f"{key}: top-1 differs"
    print(f"{fixture} {quant}: worst relative L2 {worst:.2e}")


@pytest.mark.parametrize("fixture", ALL)
def test_q8_0_keeps_top1(fixture: str) -> None:
    model, _ = converted(fixture, "q8_0", "q8_0")
    with LlamaText(model) as llm:
        for key, ids, ref in text_cases(fixture):
            got = llm.last_logits(ids)
            assert int(got.argmax()) == int(ref.argmax()), f"{fixture} q8_0 {key}: top-1 differs"
            assert rel_l2(got, ref) < 0.05


@pytest.mark.parametrize("fixture", ["llava15_hf", "bakllava_hf"])
def test_k_mix_runs(fixture: str) -> None:
    """q4_k_m (with the small-row fallbacks the tiny fixtures need) loads and stays close."""
    model, _ = converted(fixture, "q4_k_m", "q4_k")
    with LlamaText(model) as llm:
        for _key, ids, ref in text_cases(fixture):
            got = llm.last_logits(ids)
            assert np.isfinite(got).all()
            assert rel_l2(got, ref) < 0.3


@pytest.mark.parametrize("fixture", ALL)
def test_tokenizer_matches_sentencepiece(fixture: str) -> None:
    """llama.cpp's tokenizer on our vocabulary gives SentencePiece's ids for every recorded
    string, and the HF tokenizer's ids wherever HF agrees with SentencePiece."""
    meta, arrays = goldens(fixture)
    model, _ = converted(fixture, "f32", "f32")
    with LlamaText(model) as llm:
        for s in meta["tokenizer"]["strings"]:
            ours = llm.tokenize(s["text"], add_special=True)
            assert ours == [int(x) for x in arrays[s["key"] + ".sp_ids"]], s["text"]
            if s["hf_equals_sp"]:
                assert ours == [int(x) for x in arrays[s["key"] + ".hf_ids"]], s["text"]


def test_image_token_is_a_special_token() -> None:
    """llava-hf's <image> (image_token_index) is one control token when parsing specials."""
    d = fixture_dir("llava15_hf")
    image_id = json.loads((d / "config.json").read_text())["image_token_index"]
    model, _ = converted("llava15_hf", "f32", "f32")
    with LlamaText(model) as llm:
        ids = llm.tokenize("USER: <image>\nHi", parse_special=True)
        assert ids.count(image_id) == 1
        assert image_id not in llm.tokenize("USER: <image>\nHi", parse_special=False)


def test_bin_checkpoint_converts_with_torch(tmp_path: Path) -> None:
    """The real .bin path (torch.load(weights_only=True)); skipped where torch is absent."""
    pytest.importorskip("torch")
    from mmchat.converters import convert
    from support.models import CLIP_TOWER

    res = convert(
        fixture_dir("bakllava_orig"),
        outdir=tmp_path,
        quant="f16",
        vision_quant="f16",
        vision_tower=CLIP_TOWER,
    )
    assert res.model_path.is_file() and res.mmproj_path.is_file()


def test_tokenizer_json_only(tmp_path: Path) -> None:
    """Without tokenizer.model, the byte-fallback BPE tokenizer.json gives the same ids."""
    import shutil

    from mmchat.converters import convert

    src = tmp_path / "src"
    shutil.copytree(fixture_dir("llava15_hf"), src)
    (src / "tokenizer.model").unlink()
    res = convert(src, outdir=tmp_path / "out", quant="f32", vision_quant="f32")
    meta, arrays = goldens("llava15_hf")
    with LlamaText(res.model_path) as llm:
        for s in meta["tokenizer"]["strings"]:
            assert llm.tokenize(s["text"]) == [int(x) for x in arrays[s["key"] + ".sp_ids"]]
        _key, ids, ref = text_cases("llava15_hf")[0]
        assert rel_l2(llm.last_logits(ids), ref) < 1e-3
