"""The original releases of the Q-Former models (LAVIS InstructBLIP-Vicuna, MiniGPT-4 v1):
``.pth`` files (read with ``torch.load(weights_only=True)``, so these tests need torch) and a
Vicuna folder, converted and checked against the goldens of
tests/fixtures/make_qformer_original_fixtures.py."""

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
from mmchat.vision.synthetic import rel_l2

pytest.importorskip(
    "torch", reason="the original releases are .pth files: reading them needs torch"
)

ROOT = Path(__file__).parent / "fixtures" / "qformer_orig"
IMAGES = Path(__file__).parent / "fixtures" / "qformer" / "images"
MODELS = ["lavis_instructblip", "minigpt4"]
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


def test_minigptv2_rows_and_logits(tmp_path: Path) -> None:
    """MiniGPT-v2: EVA at twice its size (positions interpolated at convert time), 4 rows
    concatenated, llama_proj; the q/v LoRA merged into the text GGUF; [INST] prompt."""
    from mmchat.converters import convert

    from mmchat.gguf_meta import read_gguf
    from mmchat.runtime import LoadOptions, load_model
    from mmchat.vision import open_vision
    from mmchat.vision.qformer import QformerEngine

    meta = json.loads((ROOT / "goldens_v2.json").read_text())
    g = np.load(ROOT / "goldens_v2.npz")
    r = convert(ROOT / "minigptv2", outdir=tmp_path, quant="f32", vision_quant="f32")
    v = read_gguf(r.mmproj_path)
    assert v.get("clip.projector_type") == "eva_concat" and v.get("clip.vision.image_size") == 112
    lm = load_model(r.model_path, None, LoadOptions.parity(n_threads=2))
    try:
        eng = open_vision(r.mmproj_path, text_n_embd=64, n_threads=2, device="cpu")
        assert isinstance(eng, QformerEngine) and not eng.reads_instruction
        with eng:
            assert eng.tokens_for(load_image(IMAGES / "pixel.png")) == 16
            print("\nminigptv2 f32: rows / final logits, rel L2 vs the reference")
            for name in meta["images"]:
                emb = eng.encode(load_image(IMAGES / f"{name}.png"))
                ev = lm.evaluate([{"role": "user", "content": QUESTION, "images": [emb]}])
                rows = rel_l2(emb.embeddings, g[f"minigptv2/{name}/rows"])
                logits = rel_l2(ev.logits, g[f"minigptv2/{name}/logits"])
                print(f"  {name:9s} rows {rows:.2e}  logits {logits:.2e}")
                assert rows <= 2e-3 and logits <= 2e-3
                assert ev.token_ids == meta["ids_before"] + meta["ids_after"]
    finally:
        lm.close()


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


def test_truncated_pth_is_one_clear_error(tmp_path: Path) -> None:
    src = shutil.copytree(ROOT / "minigpt4", tmp_path / "m")
    data = (src / "blip2_pretrained_flant5xxl.pth").read_bytes()
    (src / "blip2_pretrained_flant5xxl.pth").write_bytes(data[: len(data) // 2])
    _fails(src, tmp_path / "out", "blip2_pretrained_flant5xxl.pth cannot be loaded safely")


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
