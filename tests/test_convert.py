"""What `mmchat convert` writes: every vision/projector tensor round-trips, the metadata
llama.cpp needs is there, the mmproj loads in llama.cpp's own mtmd, the output is atomic."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize
from mmchat.converters.checkpoint import open_checkpoint
from support.models import (
    CLIP_TOWER,
    converted,
    fixture_dir,
    mtmd_encode,
    write_safetensors,
)

HF = ["llava15_hf", "bakllava_hf"]
SAFE = [*HF, "llava15_orig"]  # the fixtures that need no torch

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}


def expected_vision_tensors(fixture: str) -> dict[str, np.ndarray]:
    """GGUF name -> source tensor (float32), mapped independently of the converter."""
    d = fixture_dir(fixture)
    out: dict[str, np.ndarray] = {}
    if fixture in HF:
        ckpt = open_checkpoint(d)
        tower, prefix = ckpt, "vision_tower.vision_model."
        proj = {
            "multi_modal_projector.linear_1.": "mm.0.",
            "multi_modal_projector.linear_2.": "mm.2.",
        }
    else:
        ckpt = open_checkpoint(d)
        tower, prefix = open_checkpoint(CLIP_TOWER), "vision_model."
        proj = {"model.mm_projector.0.": "mm.0.", "model.mm_projector.2.": "mm.2."}
    for name in tower.names():
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        gg = {
            "embeddings.class_embedding": "v.class_embd",
            "embeddings.patch_embedding.weight": "v.patch_embd.weight",
            "embeddings.position_embedding.weight": "v.position_embd.weight",
            "pre_layrnorm.weight": "v.pre_ln.weight",
            "pre_layrnorm.bias": "v.pre_ln.bias",
        }.get(rest)
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", rest)
        if m:
            gg = f"v.blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
        if gg is not None:
            out[gg] = tower[name].load().astype(np.float32)
    for src, dst in proj.items():
        for kind in ("weight", "bias"):
            out[dst + kind] = ckpt[src + kind].load().astype(np.float32)
    return out


def read_tensors(path: Path) -> dict[str, tuple[T, np.ndarray]]:
    r = GGUFReader(path)
    out = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        data = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        out[t.name] = (t.tensor_type, data)
    return out


def fields(path: Path) -> dict[str, Any]:
    r = GGUFReader(path)
    out: dict[str, Any] = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores"):
            continue
        v = f.contents()
        out[k] = v
    return out


@pytest.mark.parametrize("fixture", SAFE)
@pytest.mark.parametrize("vquant", ["f32", "f16", "q8_0"])
def test_vision_tensors_round_trip(fixture: str, vquant: str) -> None:
    _, mmproj = converted(fixture, "f32", vquant)
    want = expected_vision_tensors(fixture)
    got = read_tensors(mmproj)
    assert set(got) == set(want), "tensor names differ"
    assert "v.post_ln.weight" not in got
    for name, src in want.items():
        typ, data = got[name]
        assert data.shape == src.shape, name
        if typ == T.F32:
            assert np.array_equal(data, src), name
        elif typ == T.F16:
            assert vquant != "f32", name
            assert np.array_equal(data, src.astype(np.float16).astype(np.float32)), name
        elif typ == T.Q8_0:
            assert vquant == "q8_0"
            blocks = src.reshape(-1, 32)
            d = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
            err = np.abs(data.reshape(-1, 32) - blocks)
            # half a quantization step, plus the f16 rounding of the block scale
            assert (err <= d * (0.5 + 127 * 2.0**-11) + 1e-9).all(), name
        else:
            pytest.fail(f"{name}: unexpected type {typ.name}")
    if vquant == "q8_0":  # matrices quantized where their rows fit Q8_0's 32-blocks
        for name, (typ, data) in got.items():
            if data.ndim == 2 and name.endswith(".weight") and "embd" not in name:
                assert typ == (T.Q8_0 if data.shape[1] % 32 == 0 else T.F16), name
        assert got["v.position_embd.weight"][0] == T.F16


@pytest.mark.parametrize("fixture", SAFE)
def test_mmproj_metadata(fixture: str) -> None:
    _, mmproj = converted(fixture, "f32", "f32")
    f = fields(mmproj)
    d = fixture_dir(fixture)
    cfg = json.loads((d / "config.json").read_text())
    if fixture in HF:
        vcfg, text_width = cfg["vision_config"], cfg["text_config"]["hidden_size"]
        pre = json.loads((d / "preprocessor_config.json").read_text())
    else:
        vcfg = json.loads((CLIP_TOWER / "config.json").read_text())["vision_config"]
        text_width = cfg["hidden_size"]
        pre = json.loads((CLIP_TOWER / "preprocessor_config.json").read_text())
    assert f["general.architecture"] == "clip"
    assert f["clip.projector_type"] == "mlp"
    assert f["clip.has_vision_encoder"] is True
    assert f["clip.use_gelu"] is False  # quick-GELU, as CLIP
    assert f["clip.vision.projection_dim"] == text_width
    assert f["clip.vision.block_count"] == vcfg["num_hidden_layers"]
    assert f["clip.vision.image_size"] == vcfg["image_size"]
    assert f["clip.vision.patch_size"] == vcfg["patch_size"]
    assert f["clip.vision.embedding_length"] == vcfg["hidden_size"]
    # LLaVA's layer -2: the output of block n-2, i.e. hidden_states[n - 1]
    assert list(f["clip.vision.feature_layer"]) == [vcfg["num_hidden_layers"] - 1]
    np.testing.assert_allclose(f["clip.vision.image_mean"], pre["image_mean"], rtol=1e-6)
    np.testing.assert_allclose(f["clip.vision.image_std"], pre["image_std"], rtol=1e-6)


def test_text_metadata_and_chat_templates() -> None:
    import jinja2

    model, _ = converted("bakllava_hf", "f32", "f32")
    f = fields(model)
    assert f["general.architecture"] == "llama"
    assert f["llama.attention.sliding_window"] == 4096  # Mistral's window kept
    assert f["llama.attention.head_count_kv"] == 2
    assert f["tokenizer.ggml.model"] == "llama"
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.ggml.unknown_token_id"] == 0
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert f["mmchat.tokenizer.legacy_spaces"] is False  # llava-hf: legacy=False tokenizer
    tcfg = json.loads((fixture_dir("bakllava_hf") / "tokenizer_config.json").read_text())
    assert f["tokenizer.chat_template"] == tcfg["chat_template"]  # the checkpoint's own
    n_vocab = json.loads((fixture_dir("bakllava_hf") / "config.json").read_text())["text_config"][
        "vocab_size"
    ]
    assert len(GGUFReader(model).fields["tokenizer.ggml.token_type"].data) == n_vocab

    orig, _ = converted("llava15_orig", "f32", "f32")
    # chunked tokenization: "▁" after the image; its legacy=false tokenizer: none after </s>
    assert fields(orig)["mmchat.tokenizer.space_after_image"] is True
    assert fields(orig)["mmchat.tokenizer.legacy_spaces"] is False
    tmpl = fields(orig)["tokenizer.chat_template"]  # no template shipped: LLaVA's own format
    env = jinja2.Environment()
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]
    text = env.from_string(tmpl).render(messages=msgs, add_generation_prompt=True)
    assert text.endswith(" USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Sure? ASSISTANT:")
    assert text.startswith("A chat between a curious human and an artificial intelligence")


@pytest.mark.parametrize("fixture", SAFE)
@pytest.mark.parametrize("vquant", ["f32", "f16", "q8_0"])
def test_mmproj_loads_in_llama_cpp_mtmd(fixture: str, vquant: str) -> None:
    model, mmproj = converted(fixture, "f32", vquant)
    f = fields(mmproj)
    expected = (f["clip.vision.image_size"] // f["clip.vision.patch_size"]) ** 2
    n, emb, n_chunks = mtmd_encode(model, mmproj, 40, 30)
    assert n_chunks == 1
    assert n == expected
    assert np.isfinite(emb).all() and np.abs(emb).max() > 0


def test_result_and_atomic_names(tmp_path: Path) -> None:
    from mmchat.converters import convert

    res = convert(fixture_dir("llava15_hf"), outdir=tmp_path, name="tiny", quant="q8_0")
    assert res.model_path == tmp_path / "tiny-q8_0.gguf"
    assert res.mmproj_path == tmp_path / "mmproj-tiny-f16.gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mmproj-tiny-f16.gguf", "tiny-q8_0.gguf"]
    assert res.name == "tiny" and res.template_source == "checkpoint"
    text, vision = res.parts
    assert text.types["Q8_0"] >= 1 and text.types["F32"] >= 1
    assert vision.types == {"F32": vision.types["F32"], "F16": vision.types["F16"]}
    assert text.n_bytes == res.model_path.stat().st_size
    assert res.n_image_tokens == 16
    assert res.source["path"].endswith("llava15_hf") and res.source["quant"] == "q8_0"


def test_transformers5_key_names(tmp_path: Path) -> None:
    """A llava-hf checkpoint saved by transformers 5 (model.language_model.*, lm_head,
    model.vision_tower.* without vision_model.) converts to the same tensors."""
    import shutil

    from mmchat.converters import convert

    src = tmp_path / "t5"
    shutil.copytree(fixture_dir("llava15_hf"), src)
    ckpt = open_checkpoint(src)
    renamed = {}
    for name in ckpt.names():
        new = name
        for old, repl in (
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.vision_model.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ):
            if name.startswith(old):
                new = repl + name[len(old) :]
        renamed[new] = ckpt[name].load()
    (src / "model.safetensors").unlink()
    write_safetensors(src / "model.safetensors", renamed)
    res = convert(src, outdir=tmp_path / "out", quant="f32", vision_quant="f32")
    ref_model, ref_mmproj = converted("llava15_hf", "f32", "f32")
    for ours, ref in ((res.model_path, ref_model), (res.mmproj_path, ref_mmproj)):
        a, b = read_tensors(ours), read_tensors(ref)
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k][1], b[k][1]), k


@pytest.mark.parametrize("fixture", SAFE)
@pytest.mark.parametrize("vquant", ["f32", "f16"])
def test_image_embeddings_match_transformers(fixture: str, vquant: str) -> None:
    """End to end: our mmproj through mmchat's exact LLaVA vision engine reproduces the
    projected image embeddings transformers computed (fixture goldens)."""
    try:
        from mmchat.vision import load_image, open_vision
    except ImportError as exc:
        pytest.skip(f"mmchat.vision is not available: {exc}")
    d = fixture_dir(fixture)
    cfg = json.loads((d / "config.json").read_text())
    n_embd = cfg.get("text_config", cfg)["hidden_size"]
    _, mmproj = converted(fixture, "f32", vquant)
    try:
        engine = open_vision(mmproj, text_n_embd=n_embd)
    except Exception as exc:  # native library not built here
        pytest.skip(f"vision engine unavailable: {exc}")
    arrays = np.load(d / "goldens.npz")
    try:
        for image in ("landscape", "portrait"):
            emb = engine.encode(load_image(str(d.parent / "images" / f"{image}.png"))).embeddings
            ref = arrays[f"image.{image}.embeds"]
            assert emb.shape == ref.shape
            err = float(np.linalg.norm(emb - ref) / np.linalg.norm(ref))
            assert err <= (1e-4 if vquant == "f32" else 3e-3), f"{image}: {err:.2e}"
    finally:
        engine.close()
