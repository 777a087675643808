"""Bad input to `mmchat convert`: a clear UserError each time, and no file left under a
final name (nor a temporary one) in the output folder."""

from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path

import mmchat.converters.pipeline as pipeline
import numpy as np
import pytest
from mmchat.converters import convert, supported_architectures
from mmchat.converters.checkpoint import open_checkpoint
from support.models import CLIP_TOWER, fixture_dir, write_safetensors

from mmchat.errors import CorruptFileError, NotFoundError, UserError


def copy_fixture(name: str, dst: Path) -> Path:
    out = dst / name
    shutil.copytree(fixture_dir(name), out)
    return out


def assert_empty(outdir: Path) -> None:
    left = sorted(p.name for p in outdir.iterdir()) if outdir.exists() else []
    assert left == [], f"files left behind: {left}"


def test_unknown_architecture_lists_supported(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(
        json.dumps({"architectures": ["BlipForConditionalGeneration"]})
    )
    out = tmp_path / "out"
    with pytest.raises(UserError) as exc:
        convert(src, outdir=out)
    msg = str(exc.value)
    assert "BlipForConditionalGeneration" in msg
    for arch in supported_architectures():
        assert arch in msg
    assert "LlavaMistralForCausalLM" in msg
    assert not out.exists()


def test_missing_config_and_source(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no config\.json"):
        convert(tmp_path, outdir=tmp_path / "out")
    with pytest.raises(NotFoundError, match="No such folder"):
        convert(tmp_path / "nope", outdir=tmp_path / "out")


def test_missing_vision_tower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Original LLaVA without its CLIP tower: named by repo id, offline, no --vision-tower."""
    # huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported: import it now,
    # then patch both, so that the tests after this one are online again
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    with pytest.raises(UserError) as exc:
        convert(fixture_dir("llava15_orig"), outdir=out, quant="f32", vision_quant="f32")
    tower = json.loads((fixture_dir("llava15_orig") / "config.json").read_text())["mm_vision_tower"]
    assert tower in str(exc.value) and "--vision-tower" in str(exc.value)
    with pytest.raises(UserError, match="no such folder"):
        convert(fixture_dir("llava15_orig"), outdir=out, vision_tower=tmp_path / "missing")
    assert_empty(out)


def test_wrong_vision_tower_width(tmp_path: Path) -> None:
    """A tower of another width than the checkpoint's mm_hidden_size is refused."""
    tower = copy_fixture("clip_tower", tmp_path)
    ckpt = open_checkpoint(tower)
    cfg = json.loads((tower / "config.json").read_text())
    # halve the tower: every hidden dimension of 64 becomes 32
    w = cfg["vision_config"]["hidden_size"]
    tensors = {}
    for name in ckpt.names():
        if not name.startswith("vision_model."):
            continue
        arr = ckpt[name].load()
        sl = tuple(slice(0, s // 2) if s == w else slice(None) for s in arr.shape)
        tensors[name] = arr[sl]
    (tower / "model.safetensors").unlink()
    write_safetensors(tower / "model.safetensors", tensors)
    cfg["vision_config"]["hidden_size"] = w // 2
    (tower / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="width"):
        convert(fixture_dir("llava15_orig"), outdir=out, vision_tower=tower)
    assert_empty(out)


def test_truncated_safetensors(tmp_path: Path) -> None:
    src = copy_fixture("llava15_hf", tmp_path)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    with pytest.raises(CorruptFileError, match="truncated"):
        convert(src, outdir=out, quant="f16")
    assert_empty(out)


def test_corrupt_safetensors_header(tmp_path: Path) -> None:
    src = copy_fixture("llava15_hf", tmp_path)
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\x00garbage"
    f.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(CorruptFileError, match="not a valid safetensors file"):
        convert(src, outdir=out)
    f.write_bytes(b"")
    with pytest.raises(CorruptFileError, match="empty or truncated"):
        convert(src, outdir=out)
    assert_empty(out)


def test_missing_shard(tmp_path: Path) -> None:
    src = copy_fixture("bakllava_hf", tmp_path)
    shard = sorted(src.glob("model-0000*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CorruptFileError, match=shard.name):
        convert(src, outdir=tmp_path / "out")


def test_projector_width_must_match_the_llm(tmp_path: Path) -> None:
    src = copy_fixture("llava15_hf", tmp_path)
    ckpt = open_checkpoint(src)
    tensors = {n: ckpt[n].load() for n in ckpt.names()}
    tensors["multi_modal_projector.linear_2.weight"] = tensors[
        "multi_modal_projector.linear_2.weight"
    ][:32]
    tensors["multi_modal_projector.linear_2.bias"] = tensors["multi_modal_projector.linear_2.bias"][
        :32
    ]
    (src / "model.safetensors").unlink()
    write_safetensors(src / "model.safetensors", tensors)
    out = tmp_path / "out"
    with pytest.raises(UserError) as exc:
        convert(src, outdir=out)
    assert "projector outputs width 32" in str(exc.value)
    assert "hidden size is 64" in str(exc.value)
    assert_empty(out)


def test_unwritable_output_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="Cannot write to"):
        convert(fixture_dir("llava15_hf"), outdir=blocker / "out", quant="f32")
    with pytest.raises(UserError, match=r"not a folder|Cannot write"):
        convert(fixture_dir("llava15_hf"), outdir=blocker, quant="f32")


@pytest.mark.parametrize("fail_at", [1, 30, 70])
def test_disk_full_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    """ENOSPC while writing the mmproj (1), early in the model (30) or late (70)."""
    calls = {"n": 0}
    real = pipeline._write_tensor

    def full(writer: object, data: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(writer, data)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "_write_tensor", full)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="Not enough disk space"):
        convert(fixture_dir("llava15_hf"), outdir=out, quant="q8_0")
    assert calls["n"] == fail_at
    assert_empty(out)


def test_interrupt_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = pipeline._write_tensor
    calls = {"n": 0}

    def interrupted(writer: object, data: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        real(writer, data)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "_write_tensor", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(fixture_dir("llava15_hf"), outdir=out, quant="f16")
    assert_empty(out)


def test_bin_checkpoint_without_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    out = tmp_path / "out"
    with pytest.raises(UserError) as exc:
        convert(fixture_dir("bakllava_orig"), outdir=out, vision_tower=CLIP_TOWER)
    assert "pytorch_model.bin" in str(exc.value) and "torch" in str(exc.value)
    assert "weights_only" in str(exc.value)
    assert_empty(out)


def test_bad_quant_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="Unknown --quant"):
        convert(fixture_dir("llava15_hf"), outdir=tmp_path / "out", quant="q4_k_xl")
    assert not (tmp_path / "out").exists()


def test_bad_names(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="Invalid model name"):
        convert(fixture_dir("llava15_hf"), outdir=tmp_path / "out", name="../evil", quant="f32")
    assert not (tmp_path / "out").exists()
