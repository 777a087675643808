"""IDEFICS v1 conversion (issue 18): the tiny transformers fixture (tests/fixtures/idefics,
made by tests/fixtures/make_idefics_fixtures.py) -> the documented two-file layout
(docs/idefics-gguf.md); bad checkpoints -> one clear error and no file left behind. No native
library needed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmchat.errors import UserError

ROOT = Path(__file__).parent / "fixtures" / "idefics"
MODEL = ROOT / "idefics_tiny"


def load_file(path: str) -> dict[str, np.ndarray]:
    from mmchat.converters.checkpoint import open_checkpoint

    ckpt = open_checkpoint(Path(path).parent)
    return {ref.name: ref.load() for ref in ckpt}


def save_file(tensors: dict[str, np.ndarray], path: str) -> None:
    """A minimal safetensors writer (f32 tensors only; the fixture is f32)."""
    header: dict[str, object] = {}
    blobs, off = [], 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(arr.shape),
            "data_offsets": [off, off + len(raw)],
        }
        blobs.append(raw)
        off += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def convert(src: Path, out: Path, quant: str = "f32", vq: str = "f32") -> tuple[Path, Path]:
    from mmchat.converters import convert as run

    r = run(src, outdir=out, quant=quant, vision_quant=vq)
    assert r.family == "idefics"
    return r.model_path, r.mmproj_path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return convert(MODEL, tmp_path_factory.mktemp("idefics"))


def test_text_file_layout(files: tuple[Path, Path]) -> None:
    from gguf import GGUFReader

    r = GGUFReader(files[0])
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    assert arch == "llama"
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    # decoupled rows appended: 512 + 2
    assert shapes["token_embd.weight"] == (64, 514)
    assert shapes["output.weight"] == (64, 514)
    # cross_layer_interval 2 over 4 layers: blocks before layers 0 and 2
    for i in (0, 2):
        assert shapes[f"blk.{i}.xattn_k.weight"] == (48, 64)  # vision width 48 -> 64
        assert shapes[f"blk.{i}.xattn_q_norm.weight"] == (16,)
        assert shapes[f"blk.{i}.xattn_alpha"] == (64,)  # alpha_type vector
        assert shapes[f"blk.{i}.xffn_alpha"] == (64,)
    assert not any(n.startswith(("blk.1.x", "blk.3.x")) for n in shapes)
    tensors = {t.name: t for t in r.tensors}
    st = load_file(str(MODEL / "model.safetensors"))
    emb = np.asarray(tensors["token_embd.weight"].data).reshape(514, 64)
    np.testing.assert_array_equal(emb[:512], st["model.embed_tokens.weight"])
    np.testing.assert_array_equal(emb[512:], st["model.embed_tokens.additional_embedding.weight"])
    out = np.asarray(tensors["output.weight"].data).reshape(514, 64)
    np.testing.assert_array_equal(out[512:], st["lm_head.additional_fc.weight"])
    alpha = np.asarray(tensors["blk.2.xattn_alpha"].data)
    np.testing.assert_array_equal(
        alpha, st["model.gated_cross_attn_layers.1.alpha_cross_attn"].reshape(-1)
    )
    assert np.abs(alpha).min() > 0  # the fixture's gates are not transformers' zeros


def test_vision_file_layout(files: tuple[Path, Path]) -> None:
    from mmchat.gguf_meta import read_gguf

    info = read_gguf(files[1], role="projector")
    assert info.get("clip.projector_type") == "idefics"
    assert info.get("idefics.use_resampler") is True
    assert info.get("idefics.perceiver.n_latents") == 6
    assert info.get("idefics.perceiver.head_dim") == 16
    assert info.get("idefics.image_token_id") == 513
    assert info.get("idefics.fake_token_id") == 512
    names = {t.name for t in info.tensors}
    assert "perc.blk.1.q_norm.bias" in names and "perc.post_norm.weight" in names
    assert "v.post_ln.weight" not in names  # IDEFICS reads last_hidden_state (no post-LN)


def test_template_places_fake_tokens_around_image_runs(files: tuple[Path, Path]) -> None:
    from gguf import GGUFReader
    from jinja2 import Environment

    r = GGUFReader(files[0])
    tpl = bytes(r.fields["tokenizer.chat_template"].parts[-1]).decode()
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Hi"}],
        },
    ]
    text = Environment().from_string(tpl).render(messages=msgs, add_generation_prompt=True)
    # the fixture's tokenizer has no <end_of_utterance> (a base model): plain newlines
    assert text == "User:<fake_token_around_image><image><image>Hi\nAssistant:"


def test_quantized_conversion(tmp_path: Path) -> None:
    from gguf import GGUFReader

    text, _ = convert(MODEL, tmp_path, quant="q8_0", vq="f16")
    types = {t.name: t.tensor_type.name for t in GGUFReader(text).tensors}
    assert types["blk.0.xattn_q.weight"] == "Q8_0"
    assert types["blk.0.xattn_alpha"] == "F32"
    assert types["blk.0.xattn_q_norm.weight"] == "F32"


def _broken_copy(tmp_path: Path, drop: str | None = None, cfg: dict | None = None) -> Path:
    src = tmp_path / "src"
    shutil.copytree(MODEL, src)
    if drop is not None:
        st = load_file(str(src / "model.safetensors"))
        del st[drop]
        save_file(st, str(src / "model.safetensors"))
    if cfg is not None:
        c = json.loads((src / "config.json").read_text())
        c.update(cfg)
        (src / "config.json").write_text(json.dumps(c))
    return src


@pytest.mark.parametrize(
    ("drop", "cfg", "message"),
    [
        ("model.gated_cross_attn_layers.1.alpha_dense", None, "alpha_dense"),
        ("model.perceiver_resampler.latents", None, "perceiver latents"),
        (None, {"cross_layer_interval": 1}, "gated cross-attention blocks"),
        (None, {"hidden_act": "gelu"}, "hidden_act"),
        ("model.gated_cross_attn_layers.0.cross_attn.q_layer_norm.weight", None, "q_layer_norm"),
    ],
)
def test_bad_checkpoints_give_one_clear_error(
    tmp_path: Path, drop: str | None, cfg: dict | None, message: str
) -> None:
    src = _broken_copy(tmp_path, drop, cfg)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        convert(src, out)
    assert not out.exists() or not any(out.iterdir())


def test_tokenizer_without_image_tokens_is_refused(tmp_path: Path) -> None:
    src = _broken_copy(tmp_path)
    data = json.loads((src / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < 512]
    (src / "tokenizer.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="no <fake_token_around_image> token"):
        convert(src, out)
    assert not out.exists() or not any(out.iterdir())
