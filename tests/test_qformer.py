"""BLIP-2 / InstructBLIP (projector type ``qformer``): convert the tiny transformers fixtures
(tests/fixtures/qformer, made by tests/fixtures/make_qformer_fixtures.py) and check the rows
entering the LLM and the final logits against transformers' goldens; the Q-Former's WordPiece
tokenizer against BertTokenizer; bad input -> one clear error, nothing left behind."""

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
from mmchat.vision.wordpiece import read_wordpiece_folder

ROOT = Path(__file__).parent / "fixtures" / "qformer"
MODELS = ["blip2_llama", "instructblip_llama"]
QUESTION = "What is in this image?"


@cache
def goldens() -> tuple[dict[str, Any], Any]:
    return json.loads((ROOT / "goldens.json").read_text()), np.load(ROOT / "goldens.npz")


_converted: dict[tuple[str, str, str], tuple[Path, Path]] = {}


@pytest.fixture(scope="module")
def outdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qformer")


def converted(outdir: Path, model: str, quant: str = "f32", vq: str = "f32") -> tuple[Path, Path]:
    key = (model, quant, vq)
    if key not in _converted or not _converted[key][0].is_file():
        from mmchat.converters import convert

        r = convert(
            ROOT / model, outdir=outdir / f"{model}-{quant}-{vq}", quant=quant, vision_quant=vq
        )
        _converted[key] = (r.model_path, r.mmproj_path)
    return _converted[key]


def engine(mmproj: Path) -> Any:
    from mmchat.vision.qformer import QformerEngine

    return QformerEngine(mmproj, text_n_embd=64, n_threads=2, device="cpu", cache=None)


def prompt_of(model: str) -> str | None:
    return QUESTION if model.startswith("instructblip") else None


# --- the Q-Former tokenizer (no native library needed) ------------------------------------


def test_wordpiece_matches_bert_tokenizer() -> None:
    meta, _ = goldens()
    wp = read_wordpiece_folder(ROOT / "instructblip_llama" / "qformer_tokenizer")
    assert wp.tokens[-1] == "[DEC]"
    for case in meta["wordpiece"]:
        assert wp.encode(case["text"]) == case["ids"], case["text"]
    long = meta["wordpiece_long"]
    assert wp.encode(long["text"], max_length=128) == long["ids_left_truncated_128"]


# --- conversion ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_conversion_writes_the_documented_layout(outdir: Path, model: str) -> None:
    from mmchat.gguf_meta import read_gguf
    from mmchat.store.inspect import tokens_per_image

    text, mmproj = converted(outdir, model)
    v = read_gguf(mmproj)
    assert v.get("clip.projector_type") == "qformer"
    assert v.get("qformer.query_count") == 8 and v.get("qformer.cross_attention_frequency") == 2
    assert tokens_per_image(v) == 8  # what mmchat show / /api/show report
    assert v.tensor("v.blk.0.attn_k.bias") is None  # EVA: no k bias
    assert v.tensor("v.blk.0.attn_q.bias") is not None and v.tensor("v.post_ln.weight") is not None
    assert v.tensor("qf.blk.1.cross_q.weight") is None and v.tensor("qf.blk.2.cross_k.weight")
    reads_text = model.startswith("instructblip")
    assert v.get("qformer.text_input") is reads_text
    assert (v.tensor("qf.blk.0.txt_ffn_up.weight") is not None) is reads_text
    t = read_gguf(text)
    assert t.get("tokenizer.ggml.add_bos_token") is False  # the template places BOS
    assert "bos_token" in t.get("tokenizer.chat_template")


# --- rows and logits against transformers --------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_rows_match_transformers(outdir: Path, model: str) -> None:
    meta, g = goldens()
    _, mmproj = converted(outdir, model)
    with engine(mmproj) as eng:
        print(f"\n{model} f32: rows entering the LLM, rel L2 vs transformers")
        for name in meta["images"]:
            img = load_image(ROOT / "images" / f"{name}.png")
            assert rel_l2(eng.pixels(img), g[f"{model}/{name}/pixels"]) < 1e-6
            rows = eng.encode(img, prompt_of(model)).embeddings
            err = rel_l2(rows, g[f"{model}/{name}/rows"])
            print(f"  {name:9s} {img.width}x{img.height}: {err:.2e}")
            assert rows.shape == (8, 64) and err <= 2e-3, f"{model}/{name}: {err:.2e}"


def test_instructblip_rows_depend_on_the_instruction(outdir: Path) -> None:
    meta, g = goldens()
    _, mmproj = converted(outdir, "instructblip_llama")
    other = meta["models"]["instructblip_llama"]["other_instruction"]
    img = load_image(ROOT / "images" / "landscape.png")
    with engine(mmproj) as eng:
        assert eng.reads_instruction
        a = eng.encode(img, QUESTION)
        b = eng.encode(img, other)
        assert rel_l2(b.embeddings, g["instructblip_llama/landscape/rows_other"]) <= 2e-3
        assert rel_l2(a.embeddings, b.embeddings) > 0.05
        assert a.digest != b.digest  # the cache key includes the instruction
        n = eng.encode_count
        again = eng.encode(img, QUESTION)
        assert again.cached and eng.encode_count == n
        with pytest.raises(UserError, match="instruction"):
            eng.encode(img)


@pytest.mark.parametrize("model", MODELS)
def test_final_logits_with_image(outdir: Path, model: str) -> None:
    """The prompt as trained (rows, BOS, text) comes from the GGUF's chat template."""
    from mmchat.runtime import LoadOptions, load_model

    meta, g = goldens()
    text, mmproj = converted(outdir, model)
    want_ids = meta["models"][model]["input_ids"][8:]  # after the 8 <image> placeholders
    lm = load_model(text, None, LoadOptions.parity(n_threads=2))
    try:
        with engine(mmproj) as eng:
            print(f"\n{model} f32: final-position logits with an image, rel L2 vs transformers")
            for name in meta["images"]:
                emb = eng.encode(load_image(ROOT / "images" / f"{name}.png"), prompt_of(model))
                ev = lm.evaluate([{"role": "user", "content": QUESTION, "images": [emb]}])
                assert isinstance(ev.segments[0], np.ndarray)  # rows first, then BOS
                assert ev.token_ids == want_ids
                want = g[f"{model}/{name}/logits"]
                err = rel_l2(ev.logits, want)
                print(f"  {name:9s} {err:.2e}")
                assert err <= 2e-3, f"{model}/{name}: {err:.2e}"
                assert int(np.argmax(ev.logits)) == int(np.argmax(want))
    finally:
        lm.close()


@pytest.mark.parametrize("model", MODELS)
def test_runtime_encodes_through_the_engine(outdir: Path, model: str) -> None:
    """load_model(text, vision) routes the 'qformer' file to QformerEngine; the runtime
    encodes the image itself, InstructBLIP's bound by the runtime to the text of the message
    that carries it (the Q-Former's instruction)."""
    from mmchat.runtime import LoadOptions, load_model
    from mmchat.vision.qformer import QformerEngine

    _, g = goldens()
    text, mmproj = converted(outdir, model)
    lm = load_model(text, mmproj, LoadOptions.parity(n_threads=2, vision_device="cpu"))
    try:
        eng = lm.vision
        assert isinstance(eng, QformerEngine)
        img = load_image(ROOT / "images" / "portrait.png")
        if eng.reads_instruction:
            bound = eng.bind(img, QUESTION)
            other = eng.bind(img, "Describe the picture")
            assert other.digest != bound.digest  # prompt-cache keys differ per instruction
        ev = lm.evaluate([{"role": "user", "content": QUESTION, "images": [img]}])
        assert rel_l2(ev.image_embeddings[0], g[f"{model}/portrait/rows"]) <= 2e-3
        assert rel_l2(ev.logits, g[f"{model}/portrait/logits"]) <= 2e-3
    finally:
        lm.close()


@pytest.mark.parametrize("model", MODELS)
def test_top1_at_q8_0(outdir: Path, model: str) -> None:
    from mmchat.runtime import LoadOptions, load_model

    meta, g = goldens()
    text, mmproj = converted(outdir, model, "q8_0", "q8_0")
    lm = load_model(text, None, LoadOptions.parity(n_threads=2))
    try:
        with engine(mmproj) as eng:
            for name in meta["images"]:
                emb = eng.encode(load_image(ROOT / "images" / f"{name}.png"), prompt_of(model))
                assert rel_l2(emb.embeddings, g[f"{model}/{name}/rows"]) < 0.05
                ev = lm.evaluate([{"role": "user", "content": QUESTION, "images": [emb]}])
                assert int(np.argmax(ev.logits)) == int(np.argmax(g[f"{model}/{name}/logits"]))
    finally:
        lm.close()


# --- bad input -------------------------------------------------------------------------------


def _copy(model: str, dst: Path) -> Path:
    shutil.copytree(ROOT / model, dst)
    return dst


def _convert_fails(src: Path, out: Path, match: str) -> None:
    from mmchat.converters import convert

    with pytest.raises(UserError, match=match) as exc:
        convert(src, outdir=out, quant="f32", vision_quant="f32")
    assert "\n" not in str(exc.value)
    assert not out.exists() or not any(out.iterdir()), "a failed conversion left files behind"


def test_opt_language_model_is_refused_in_one_line(tmp_path: Path) -> None:
    src = _copy("blip2_llama", tmp_path / "opt")
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["model_type"] = "opt"
    (src / "config.json").write_text(json.dumps(cfg))
    _convert_fails(src, tmp_path / "out", r"OPT.*llama\.cpp.*vLLM or transformers")


def test_missing_qformer_tokenizer(tmp_path: Path) -> None:
    src = _copy("instructblip_llama", tmp_path / "ib")
    shutil.rmtree(src / "qformer_tokenizer")
    _convert_fails(src, tmp_path / "out", "qformer_tokenizer")


def test_wrong_llm_width(tmp_path: Path) -> None:
    from mmchat.converters.checkpoint import open_checkpoint
    from support.models import write_safetensors

    src = _copy("blip2_llama", tmp_path / "w")
    ckpt = open_checkpoint(src)
    tensors = {name: ckpt[name].load() for name in ckpt.names()}
    tensors["language_projection.weight"] = np.zeros((80, 48), np.float32)
    tensors["language_projection.bias"] = np.zeros((80,), np.float32)
    write_safetensors(src / "model.safetensors", tensors)
    _convert_fails(src, tmp_path / "out", "language projection outputs width 80")


def test_missing_qformer_weights(tmp_path: Path) -> None:
    from mmchat.converters.checkpoint import open_checkpoint
    from support.models import write_safetensors

    src = _copy("blip2_llama", tmp_path / "nq")
    ckpt = open_checkpoint(src)
    keep = {n: ckpt[n].load() for n in ckpt.names() if not n.startswith("qformer.")}
    write_safetensors(src / "model.safetensors", keep)
    _convert_fails(src, tmp_path / "out", "no Q-Former")


def test_truncated_vision_file_is_one_clear_error(outdir: Path, tmp_path: Path) -> None:
    from mmchat.vision import open_vision

    _, mmproj = converted(outdir, "blip2_llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(mmproj.read_bytes()[: mmproj.stat().st_size // 2])
    with pytest.raises(UserError) as exc:
        open_vision(cut, text_n_embd=64)
    assert "\n" not in str(exc.value) and "cut.gguf" in str(exc.value)


def test_native_checks_text_input(outdir: Path) -> None:
    from mmchat.native import NativeError, NativeVisionModel, load_library
    from mmchat.native.model import MMV_ERR_INVALID_ARGUMENT

    lib = load_library()
    px = np.zeros((1, 3, 56, 56), np.float32)
    with NativeVisionModel(lib, converted(outdir, "blip2_llama")[1], device="cpu") as m:
        assert not m.info.text_input and m.info.n_tokens == 8 and m.info.n_embd == 64
        with pytest.raises(NativeError, match="reads no text") as e:
            m.encode(px, [2, 3])
        assert e.value.status == MMV_ERR_INVALID_ARGUMENT
    with NativeVisionModel(lib, converted(outdir, "instructblip_llama")[1], device="cpu") as m:
        assert m.info.text_input and m.info.n_text_max == 64 and m.info.n_text_vocab == 151
        with pytest.raises(NativeError, match="mmv_encode_text"):
            m.encode(px)
        with pytest.raises(NativeError, match="outside the vocabulary"):
            m.encode(px, [2, 151, 3])
        with pytest.raises(NativeError, match="at most 64"):
            m.encode(px, [2] * 65)
    with pytest.raises(NativeError, match="width is 32"):
        NativeVisionModel(lib, converted(outdir, "blip2_llama")[1], expected_n_embd=32)
