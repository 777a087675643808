"""The original releases of the Q-Former models (LAVIS InstructBLIP-Vicuna, MiniGPT-4 v1):
``.pth`` files (read with ``torch.load(weights_only=True)``, so these tests need torch) and a
Vicuna folder, converted and checked against the goldens of
tests/fixtures/make_qformer_original_fixtures.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmchat.errors import UserError
from mmchat.vision.image import load_image
from mmchat.vision.synthetic import rel_l2

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(
    not HAS_TORCH, reason="the original releases are .pth files: reading them needs torch"
)

ROOT = Path(__file__).parent / "fixtures" / "qformer_orig"
IMAGES = Path(__file__).parent / "fixtures" / "qformer" / "images"
MODELS = ["lavis_instructblip", "minigpt4"]
# f32 conversions committed for the default suite (convert_qformer_original_fixtures.py):
# without torch the eva_concat tests run on them; with torch a fresh conversion must equal them
COMMITTED = {"minigpt4_llama2": ROOT / "gguf" / "minigpt4_llama2"}
QUESTION = "What is in this image?"


@cache
def goldens() -> tuple[dict[str, Any], Any]:
    return json.loads((ROOT / "goldens.json").read_text()), np.load(ROOT / "goldens.npz")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    from mmchat.converters import convert

    out = tmp_path_factory.mktemp("orig")
    result = {}
    for m in MODELS:
        r = convert(ROOT / m, outdir=out / m, quant="f32", vision_quant="f32")
        result[m] = (r.model_path, r.mmproj_path)
    return result


@needs_torch
@pytest.mark.parametrize("model", MODELS)
def test_rows_and_logits_match_the_reference(
    files: dict[str, tuple[Path, Path]], model: str
) -> None:
    from mmchat.gguf_meta import read_gguf
    from mmchat.runtime import LoadOptions, load_model
    from mmchat.vision.qformer import QformerEngine

    meta, g = goldens()
    text, mmproj = files[model]
    assert read_gguf(mmproj).get("qformer.ln_vision.layer_norm_epsilon") == pytest.approx(1e-5)
    mm = meta[model]
    want_ids = mm["text_ids"] if "text_ids" in mm else mm["ids_before"] + mm["ids_after"]
    lm = load_model(text, None, LoadOptions.parity(n_threads=2))
    try:
        with QformerEngine(mmproj, text_n_embd=64, n_threads=2, device="cpu") as eng:
            assert eng.reads_instruction is (model == "lavis_instructblip")
            print(f"\n{model} f32: rows / final logits, rel L2 vs the reference")
            for name in meta["images"]:
                img = load_image(IMAGES / f"{name}.png")
                emb = eng.encode(img, QUESTION if eng.reads_instruction else None)
                ev = lm.evaluate([{"role": "user", "content": QUESTION, "images": [emb]}])
                rows = rel_l2(emb.embeddings, g[f"{model}/{name}/rows"])
                logits = rel_l2(ev.logits, g[f"{model}/{name}/logits"])
                print(f"  {name:9s} rows {rows:.2e}  logits {logits:.2e}")
                assert rows <= 2e-3 and logits <= 2e-3
                assert ev.token_ids == want_ids  # the prompt as trained, from the GGUF template
    finally:
        lm.close()


# (fixture folder, goldens stem, image size after conversion, rows for any image)
CONCAT_VARIANTS = {
    "minigptv2": ("goldens_v2", 112, 16),
    "minigpt4_llama2": ("goldens_llama2", 56, 4),
}


def _converted(variant: str, outdir: Path) -> tuple[Path, Path]:
    """The variant converted here (torch reads the .pth), else its committed f32 pair."""
    if not HAS_TORCH:
        if variant not in COMMITTED:
            pytest.skip("the original releases are .pth files: reading them needs torch")
        return COMMITTED[variant] / "text.gguf", COMMITTED[variant] / "mmproj.gguf"
    from mmchat.converters import convert

    r = convert(ROOT / variant, outdir=outdir, quant="f32", vision_quant="f32")
    return r.model_path, r.mmproj_path


@pytest.mark.parametrize("variant", sorted(CONCAT_VARIANTS))
def test_eva_concat_rows_and_logits(tmp_path: Path, variant: str) -> None:
    """MiniGPT-v2: EVA at twice its size (positions interpolated at convert time), 4 rows
    concatenated, llama_proj; the q/v LoRA merged into the text GGUF; [INST] prompt.
    MiniGPT-4 on Llama 2: the same at EVA's own size, no LoRA, a fresh ln_vision, the
    system text then ``<s>[INST] … [/INST] ``."""
    from mmchat.gguf_meta import read_gguf
    from mmchat.runtime import LoadOptions, load_model
    from mmchat.store.inspect import tokens_per_image
    from mmchat.vision import open_vision
    from mmchat.vision.qformer import QformerEngine

    stem, size, n_rows = CONCAT_VARIANTS[variant]
    meta = json.loads((ROOT / f"{stem}.json").read_text())
    g = np.load(ROOT / f"{stem}.npz")
    text, mmproj = _converted(variant, tmp_path)
    v = read_gguf(mmproj)
    assert v.get("clip.projector_type") == "eva_concat" and v.get("clip.vision.image_size") == size
    lm = load_model(text, None, LoadOptions.parity(n_threads=2))
    try:
        eng = open_vision(mmproj, text_n_embd=64, n_threads=2, device="cpu")
        assert isinstance(eng, QformerEngine) and not eng.reads_instruction
        with eng:
            assert eng.tokens_for(load_image(IMAGES / "pixel.png")) == n_rows
            assert tokens_per_image(v) == n_rows  # what mmchat show / /api/show report
            print(f"\n{variant} f32: rows / final logits, rel L2 vs the reference")
            for name in meta["images"]:
                emb = eng.encode(load_image(IMAGES / f"{name}.png"))
                ev = lm.evaluate([{"role": "user", "content": QUESTION, "images": [emb]}])
                rows = rel_l2(emb.embeddings, g[f"{variant}/{name}/rows"])
                logits = rel_l2(ev.logits, g[f"{variant}/{name}/logits"])
                print(f"  {name:9s} rows {rows:.2e}  logits {logits:.2e}")
                assert rows <= 2e-3 and logits <= 2e-3
                assert ev.token_ids == meta["ids_before"] + meta["ids_after"]
    finally:
        lm.close()


@pytest.mark.parametrize("variant", sorted(CONCAT_VARIANTS))
def test_eva_concat_mmchat_run(tmp_path: Path, variant: str) -> None:
    """`mmchat run <text.gguf> --mmproj <vision.gguf> "… ./photo.png"` answers with the
    in-process greedy reply."""
    from mmchat.runtime import LoadOptions, SamplingParams, load_model

    text, mmproj = _converted(variant, tmp_path / "out")
    shutil.copy(IMAGES / "portrait.png", tmp_path / "photo.png")
    run = _mmchat(
        tmp_path / "home",
        tmp_path,
        *("run", str(text), "--mmproj", str(mmproj), "--max-tokens", "6"),
        *("--temperature", "0", "Describe it. ./photo.png"),
    )
    assert run.returncode == 0, run.stderr
    assert "Added image './photo.png'" in run.stderr
    with load_model(text, mmproj, LoadOptions(n_threads=2)) as lm:
        chat = lm.session(params=SamplingParams(temperature=0, max_tokens=6, seed=1))
        reply = chat.ask("Describe it.", [load_image(tmp_path / "photo.png")])
    assert run.stdout.strip() == reply.text.strip() != ""


@needs_torch
def test_minigptv2_without_lora_is_refused(tmp_path: Path) -> None:
    import torch

    src = shutil.copytree(ROOT / "minigptv2", tmp_path / "v2")
    path = src / "minigptv2_checkpoint.pth"
    sd = torch.load(path, weights_only=True)
    sd["model"] = {k: v for k, v in sd["model"].items() if "lora" not in k}
    torch.save(sd, path)
    _fails(src, tmp_path / "out", "no LoRA")


def _fails(src: Path, out: Path, match: str) -> None:
    from mmchat.converters import convert

    with pytest.raises(UserError, match=match) as exc:
        convert(src, outdir=out, quant="f32", vision_quant="f32")
    assert "\n" not in str(exc.value)
    assert not out.exists() or not any(out.iterdir())


@needs_torch
def test_truncated_pth_is_one_clear_error(tmp_path: Path) -> None:
    src = shutil.copytree(ROOT / "minigpt4", tmp_path / "m")
    data = (src / "blip2_pretrained_flant5xxl.pth").read_bytes()
    (src / "blip2_pretrained_flant5xxl.pth").write_bytes(data[: len(data) // 2])
    _fails(src, tmp_path / "out", "blip2_pretrained_flant5xxl.pth cannot be loaded safely")


@needs_torch
def test_missing_files(tmp_path: Path) -> None:
    src = shutil.copytree(ROOT / "minigpt4", tmp_path / "m")
    (src / "blip2_pretrained_flant5xxl.pth").unlink()
    _fails(src, tmp_path / "o1", "has no blip2_pretrained_flant5xxl.pth")
    src = shutil.copytree(ROOT / "lavis_instructblip", tmp_path / "l")
    shutil.rmtree(src / "bert-base-uncased")
    _fails(src, tmp_path / "o2", "bert-base-uncased/vocab.txt")
    shutil.rmtree(src / "vicuna")
    _fails(src, tmp_path / "o3", "language model folder")
    (src / "eva_vit_g.pth").unlink()
    _fails(src, tmp_path / "o4", "no config.json")


@needs_torch
def test_lavis_opt_checkpoint_is_refused(tmp_path: Path) -> None:
    import torch

    src = shutil.copytree(ROOT / "lavis_instructblip", tmp_path / "opt")
    path = src / "instruct_blip_vicuna7b_trimmed.pth"
    sd = torch.load(path, weights_only=True)
    model = sd["model"]
    model["opt_proj.weight"] = model.pop("llm_proj.weight")
    model["opt_proj.bias"] = model.pop("llm_proj.bias")
    torch.save(sd, path)
    _fails(src, tmp_path / "out", r"OPT.*vLLM or transformers")


def _mmchat(home: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmchat", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "MMCHAT_HOME": str(home)},
    )


@needs_torch
def test_parts_elsewhere_convert_with_flags_then_run(tmp_path: Path) -> None:
    """MiniGPT-4 (Vicuna) with eva_vit_g.pth, the BLIP-2 Q-Former and the LLM in other
    places: `mmchat convert --eva --qformer --llm`, then `mmchat run` by name with an image;
    the reply is the in-process greedy one of the files converted from one folder."""
    src = shutil.copytree(ROOT / "minigpt4", tmp_path / "m")
    other = tmp_path / "elsewhere"
    other.mkdir()
    for name in ("eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", "vicuna"):
        shutil.move(src / name, other / name)
    home = tmp_path / "home"
    _fails(src, tmp_path / "o0", r"has no blip2_pretrained_flant5xxl\.pth \(or give .* --qformer\)")
    r = _mmchat(
        home,
        tmp_path,
        *("convert", str(src), "--name", "mg4", "--quant", "f32", "--vision-quant", "f32"),
        *("--outdir", str(tmp_path / "out"), "--eva", str(other / "eva_vit_g.pth")),
        *("--qformer", str(other / "blip2_pretrained_flant5xxl.pth")),
        *("--llm", str(other / "vicuna")),
    )
    assert r.returncode == 0, r.stderr
    shutil.copy(IMAGES / "landscape.png", tmp_path / "photo.png")
    question = "What is in this image? ./photo.png"
    r = _mmchat(home, tmp_path, "run", "mg4", "--max-tokens", "6", "--temperature", "0", question)
    assert r.returncode == 0, r.stderr
    assert "Added image './photo.png'" in r.stderr
    answer = r.stdout.strip()

    from mmchat.converters import convert

    from mmchat.runtime import LoadOptions, SamplingParams, load_model

    whole = convert(ROOT / "minigpt4", outdir=tmp_path / "whole", quant="f32", vision_quant="f32")
    with load_model(whole.model_path, whole.mmproj_path, LoadOptions(n_threads=2)) as lm:
        chat = lm.session(params=SamplingParams(temperature=0, max_tokens=6, seed=1))
        reply = chat.ask("What is in this image?", [load_image(tmp_path / "photo.png")])
    assert answer == reply.text.strip()


@needs_torch
def test_flags_a_family_does_not_read_are_refused(tmp_path: Path) -> None:
    from mmchat.converters import convert

    with pytest.raises(UserError, match="--qformer does not apply to MiniGPT-v2"):
        convert(
            ROOT / "minigptv2",
            outdir=tmp_path / "a",
            quant="f32",
            files={"qformer": ROOT / "minigpt4" / "blip2_pretrained_flant5xxl.pth"},
        )
    with pytest.raises(UserError, match="only for original LAVIS / MiniGPT-4 releases"):
        convert(
            Path(__file__).parent / "fixtures" / "qformer" / "blip2_llama",
            outdir=tmp_path / "b",
            quant="f32",
            files={"llm": ROOT / "minigpt4" / "vicuna"},
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@needs_torch
@pytest.mark.parametrize("variant", sorted(COMMITTED))
def test_committed_files_equal_a_fresh_conversion(tmp_path: Path, variant: str) -> None:
    """The default suite's committed GGUFs are what the converter writes today."""
    from support.gguf_compare import assert_same_gguf

    sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
    from convert_qformer_original_fixtures import convert_variant

    fresh = convert_variant(variant, tmp_path)
    for got_path, name in zip(fresh, ("text.gguf", "mmproj.gguf"), strict=True):
        assert_same_gguf(got_path, COMMITTED[variant] / name)
