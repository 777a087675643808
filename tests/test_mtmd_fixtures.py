"""The committed mtmd-family fixtures (tests/fixtures/mtmd, issue 14) load, and llama.cpp's own
mtmd path (tests/support/mtmd_ref.py) runs on each of them with the layout the family is
known for. No torch: the transformers goldens were computed when the fixtures were made."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.mtmd_ref import MARKER, Reference, mtmd_reference, rel_l2

ROOT = Path(__file__).resolve().parent / "fixtures" / "mtmd"
MANIFEST: dict[str, Any] = json.loads((ROOT / "manifest.json").read_text())
FAMILIES = sorted(MANIFEST["families"])
VISION = [f for f in FAMILIES if MANIFEST["families"][f]["kind"] == "vision"]
AUDIO = [f for f in FAMILIES if MANIFEST["families"][f]["kind"] == "audio"]

EXPECTED_PROJECTOR = {
    "gemma3": "gemma3",
    "qwen2vl": "qwen2vl_merger",
    "qwen25vl": "qwen2.5vl_merger",
    "smolvlm": "idefics3",
    "idefics3": "idefics3",
    "internvl": "internvl",
    "mistral3": "pixtral",
    "qwen2audio": "qwen2a",
}


def _field(reader: Any, name: str) -> Any:
    f = reader.fields.get(name)
    return None if f is None else f.contents()


@functools.cache
def _header(path: Path) -> dict[str, Any]:
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(str(path))
    return {
        "arch": _field(r, "general.architecture"),
        "projector": _field(r, "clip.projector_type"),
        "template": _field(r, "tokenizer.chat_template"),
        "n_tokens": len(_field(r, "tokenizer.ggml.tokens") or []),
        "n_tensors": len(r.tensors),
        "tensor_names": frozenset(t.name for t in r.tensors),
    }


def _files(family: str) -> tuple[Path, Path]:
    return ROOT / family / "model.gguf", ROOT / family / "mmproj.gguf"


@functools.cache
def _reference(family: str, media_name: str) -> Reference:
    pytest.importorskip("llama_cpp")
    model, mmproj = _files(family)
    golden = MANIFEST["families"][family]["golden"]
    return mtmd_reference(model, mmproj, golden["prompt"], [ROOT / "images" / media_name])


def test_manifest_names_every_family_and_file() -> None:
    assert set(FAMILIES) == set(EXPECTED_PROJECTOR)
    assert AUDIO == ["qwen2audio"]
    for fam, entry in MANIFEST["families"].items():
        for rel in entry["files"].values():
            assert (ROOT / rel).is_file(), f"{fam}: {rel} missing"
        assert entry["template_origin"]
        assert isinstance(entry["mrope"], bool)
        assert MARKER in entry["golden"]["prompt"]
        size = sum((ROOT / rel).stat().st_size for rel in entry["files"].values())
        assert size < 3 * 1024 * 1024, f"{fam}: {size} bytes"
    assert set(MANIFEST["generated_with"]) >= {"transformers", "torch", "converter"}
    for rel in MANIFEST["media"].values():
        assert (ROOT / rel).is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_headers(family: str) -> None:
    model, mmproj = _files(family)
    text, proj = _header(model), _header(mmproj)
    assert text["arch"] == MANIFEST["families"][family]["text_architecture"]
    assert text["n_tensors"] > 0 and proj["n_tensors"] > 0
    assert proj["arch"] == "clip"
    assert proj["projector"] == EXPECTED_PROJECTOR[family]
    template = text["template"]
    assert template and MANIFEST["families"][family]["media_text"].strip() in template
    if family == "mistral3":  # the converter must keep Pixtral's [IMG_BREAK] embedding
        assert "v.token_embd.img_break" in proj["tensor_names"]


@pytest.mark.parametrize("family", VISION)
def test_reference_runs_one_image(family: str) -> None:
    ref = _reference(family, "square.png")
    entry = MANIFEST["families"][family]
    assert ref.logits.dtype == np.float32
    assert ref.logits.shape == (_header(_files(family)[0])["n_tokens"],)
    assert np.isfinite(ref.logits).all() and float(ref.logits.std()) > 0.1
    assert [list(x) for x in ref.layout()] == entry["golden"]["mtmd_layout"]
    assert ref.use_mrope == entry["mrope"]
    images = [c for c in ref.chunks if c.kind == "image"]
    assert images and ref.chunks[0].kind == "text" and ref.chunks[-1].kind == "text"
    if entry["mrope"]:  # one position per image row, not per token
        assert all(c.n_pos < c.n_tokens for c in images)
        assert ref.n_past < sum(c.n_tokens for c in ref.chunks)
    else:
        assert all(c.n_pos == c.n_tokens for c in ref.chunks)
        assert ref.n_past == sum(c.n_tokens for c in ref.chunks)


def test_layouts_of_the_families() -> None:
    """What each family's mtmd layout looks like for the 64x64 and the 128x64 image."""
    n_img = {
        f: len([c for c in _reference(f, "square.png").chunks if c.kind == "image"]) for f in VISION
    }
    assert n_img["gemma3"] == n_img["qwen2vl"] == n_img["qwen25vl"] == n_img["mistral3"] == 1
    assert n_img["smolvlm"] > 1 and n_img["idefics3"] > 1  # overview + tiles
    assert n_img["internvl"] > 1  # tiles + thumbnail
    # gemma3: a fixed 16-token image between <start_of_image> and <end_of_image>
    g = _reference("gemma3", "square.png")
    assert [c.n_tokens for c in g.chunks if c.kind == "image"] == [16]
    # SmolVLM scales the longest edge to 128 px and cuts 64 px tiles: the square image is
    # 2x2 tiles + overview, the 128x64 one 2x1 tiles + overview
    wide = _reference("smolvlm", "wide.png")
    assert n_img["smolvlm"] == 5
    assert len([c for c in wide.chunks if c.kind == "image"]) == 3
    # Pixtral: [IMG_BREAK] rows live inside the image chunk, [IMG_END] starts the next text
    m = _reference("mistral3", "square.png")
    i = next(k for k, c in enumerate(m.chunks) if c.kind == "image")
    assert m.chunks[i + 1].tokens[0] == 13  # [IMG_END]


@pytest.mark.parametrize("family", AUDIO)
def test_reference_runs_audio(family: str) -> None:
    ref = _reference(family, "tone.wav")
    audio = [c for c in ref.chunks if c.kind == "audio"]
    assert len(audio) == 1 and audio[0].n_tokens > 0
    assert np.isfinite(ref.logits).all()
    assert [list(x) for x in ref.layout()] == MANIFEST["families"][family]["golden"]["mtmd_layout"]


@pytest.mark.parametrize("family", FAMILIES)
def test_goldens_match_the_layout(family: str) -> None:
    """The golden was computed on mtmd's own layout; llama.cpp stays near transformers
    (how near is informational: printed, loosely bounded)."""
    entry = MANIFEST["families"][family]
    media = "tone.wav" if entry["kind"] == "audio" else "square.png"
    ref = _reference(family, media)
    with np.load(ROOT / family / "golden.npz", allow_pickle=False) as z:
        ids, logits, prompt = z["input_ids"], z["logits"], str(z["prompt"])
    assert prompt == entry["golden"]["prompt"]
    assert len(ids) == sum(c.n_tokens for c in ref.chunks)
    text_ids = [t for c in ref.chunks for t in c.tokens]
    assert set(text_ids) <= set(ids.tolist())
    n = min(len(logits), len(ref.logits))
    err = rel_l2(ref.logits[:n], logits[:n])
    print(f"{family}: mtmd vs transformers rel L2 {err:.2e}")
    assert err < 0.05
    assert int(np.argmax(ref.logits[:n])) == int(np.argmax(logits[:n]))


def test_reference_rejects_a_marker_mismatch() -> None:
    model, mmproj = _files("gemma3")
    with pytest.raises(ValueError, match="marker"):
        mtmd_reference(model, mmproj, "no marker here", [ROOT / "images" / "square.png"])


def test_reference_two_images_from_files_and_bytes() -> None:
    """Two media in one prompt, one given as a path and one as the file's bytes: the same
    layout and logits as two paths."""
    pytest.importorskip("llama_cpp")
    model, mmproj = _files("qwen2vl")
    prompt = MANIFEST["families"]["qwen2vl"]["golden"]["prompt"].replace(MARKER, MARKER * 2)
    square, wide = ROOT / "images" / "square.png", ROOT / "images" / "wide.png"
    a = mtmd_reference(model, mmproj, prompt, [square, wide])
    b = mtmd_reference(model, mmproj, prompt, [square, wide.read_bytes()])
    assert a.layout() == b.layout()
    assert [c.kind for c in a.chunks].count("image") == 2
    assert rel_l2(a.logits, b.logits) == 0.0
    # M-RoPE: positions advance by each image's n_pos, not by its token count
    assert a.n_past == sum(c.n_pos for c in a.chunks) < sum(c.n_tokens for c in a.chunks)


def test_reference_reports_unreadable_media(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    model, mmproj = _files("gemma3")
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is text, not a picture")
    with pytest.raises(RuntimeError, match="could not read the media"):
        mtmd_reference(model, mmproj, "look: " + MARKER, [bad])
