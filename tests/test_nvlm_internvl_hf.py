"""transformers' own InternVL (``InternVLForConditionalGeneration``, InternVL3-*-hf layout) on
the NVLM-D path (projector type ``internvit``, prompt style ``internvl``): convert the tiny
fixture (tests/fixtures/nvlm/internvl_hf, made by make_internvl_hf_fixtures.py) and check rows
and final logits against transformers' own forward."""

from __future__ import annotations

import json
import shutil
import struct
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
    assert (
        v.tensor("v.blk.0.attn_q.bias") is not None and v.tensor("mm.model.mlp.1.bias") is not None
    )


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


# --- InternVL's own remote-code layout (InternVLChatModel) ----------------------------------


def _read_st(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32"
        lo, hi = (8 + n + o for o in info["data_offsets"])
        out[name] = np.frombuffer(raw[lo:hi], dtype=np.float32).reshape(info["shape"])
    return out


def _write_st(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def chat_layout(dst: Path) -> Path:
    """The InternVL-hf fixture's weights in InternVLChatModel's names and config."""
    hf = _read_st(SRC / "model.safetensors")
    cfg = json.loads((SRC / "config.json").read_text())
    v, t = cfg["vision_config"], cfg["text_config"]
    out: dict[str, np.ndarray] = {}
    vt = "vision_tower."  # save_pretrained writes the hub names
    out["vision_model.embeddings.class_embedding"] = hf[vt + "embeddings.cls_token"]
    out["vision_model.embeddings.position_embedding"] = hf[vt + "embeddings.position_embeddings"]
    for k in ("weight", "bias"):
        out[f"vision_model.embeddings.patch_embedding.{k}"] = hf[
            f"{vt}embeddings.patch_embeddings.projection.{k}"
        ]
    for i in range(v["num_hidden_layers"]):
        a, b = f"{vt}encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        for k in ("weight", "bias"):
            out[f"{b}attn.qkv.{k}"] = np.concatenate(
                [hf[f"{a}attention.{x}_proj.{k}"] for x in "qkv"]
            )
            for src, dst_ in (
                ("attention.projection_layer", "attn.proj"),
                ("layernorm_before", "norm1"),
                ("layernorm_after", "norm2"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                out[f"{b}{dst_}.{k}"] = hf[f"{a}{src}.{k}"]
        out[b + "ls1"], out[b + "ls2"] = hf[a + "lambda_1"], hf[a + "lambda_2"]
    for src, dst_ in (("layer_norm", "0"), ("linear_1", "1"), ("linear_2", "3")):
        for k in ("weight", "bias"):
            out[f"mlp1.{dst_}.{k}"] = hf[f"multi_modal_projector.{src}.{k}"]
    for name, arr in hf.items():
        if name.startswith("language_model."):  # the same names in both layouts
            out[name] = arr
    dst.mkdir(parents=True)
    _write_st(dst / "model.safetensors", out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(SRC / name, dst / name)
    config = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "use_thumbnail": True,
        "ps_version": "v2",
        "select_layer": -1,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "hidden_size": v["hidden_size"],
            "num_attention_heads": v["num_attention_heads"],
            "intermediate_size": v["intermediate_size"],
            "num_hidden_layers": v["num_hidden_layers"],
            "image_size": 448,
            "patch_size": 14,
            "norm_type": "layer_norm",
            "qk_normalization": False,
            "qkv_bias": True,
            "layer_norm_eps": v["layer_norm_eps"],
            "hidden_act": "gelu",
        },
        "llm_config": {**t, "architectures": ["Qwen2ForCausalLM"]},
    }
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_internvl_chat_layout_matches_transformers(tmp_path: Path) -> None:
    from mmchat.converters import convert

    from mmchat.gguf_meta import read_gguf
    from mmchat.runtime import LoadOptions, load_model

    meta, g = goldens()
    r = convert(
        chat_layout(tmp_path / "chat"), outdir=tmp_path / "out", quant="f32", vision_quant="f32"
    )
    v = read_gguf(r.mmproj_path)
    assert v.get("mmchat.vision.family") == "internvl_chat"
    assert v.get("internvit.prompt_style") == "internvl"
    assert v.get("internvit.dummy_heads_stripped") == 0
    with load_model(r.model_path, r.mmproj_path, LoadOptions.parity(n_threads=2)) as lm:
        for name, info in meta["images"].items():
            img = load_image(ROOT / "images" / f"{name}.png")
            ev = lm.evaluate([{"role": "user", "content": meta["question"], "images": [img]}])
            assert ev.token_ids == info["text_ids"]
            assert rel_l2(lm.vision.encode(img).embeddings, g[f"{name}/rows"]) <= 2e-3
            assert rel_l2(ev.logits, g[f"{name}/logits"]) <= 2e-3, name
