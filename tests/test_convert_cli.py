"""`mmchat convert` from the command line, and SRC / vision towers as Hugging Face repo ids
downloaded through the real huggingface_hub client from a local fake hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mmchat.converters import convert
from support.fakehub import FakeHub, patch_endpoint
from support.models import CLIP_TOWER, fixture_dir
from typer.testing import CliRunner

from mmchat.cli import app
from mmchat.errors import CorruptFileError, NotFoundError


def test_cli_convert_and_register(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "convert",
            str(fixture_dir("llava15_hf")),
            "--name",
            "tiny-llava",
            "--quant",
            "q8_0",
            "--outdir",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "tiny-llava-q8_0.gguf" in res.output and "mmproj-tiny-llava-f16.gguf" in res.output
    assert "language model" in res.output and "Q8_0" in res.output
    assert (out / "tiny-llava-q8_0.gguf").is_file() and (
        out / "mmproj-tiny-llava-f16.gguf"
    ).is_file()
    try:
        from mmchat.store import open_store
    except ImportError:
        pytest.skip("no model store yet")
    rec = open_store().resolve("tiny-llava")
    assert rec.model_path.is_file() and rec.mmproj_path is not None
    assert "registered as" in res.output


def test_cli_no_register_and_vision_tower(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "convert",
            str(fixture_dir("llava15_orig")),
            "--vision-tower",
            str(CLIP_TOWER),
            "--quant",
            "f16",
            "--vision-quant",
            "q8_0",
            "-o",
            str(tmp_path),
            "--no-register",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "llava15_orig-f16.gguf").is_file()
    assert (tmp_path / "mmproj-llava15_orig-q8_0.gguf").is_file()
    assert "registered" not in res.output


def test_cli_user_error_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["MllamaForConditionalGeneration"]}')
    proc = subprocess.run(
        [sys.executable, "-m", "mmchat", "convert", str(tmp_path), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 2
    assert "Unsupported architecture MllamaForConditionalGeneration" in proc.stderr
    assert "LlavaForConditionalGeneration" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def _files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_file() and not p.name.startswith("goldens")}


def test_repo_id_source_and_tower_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SRC as a repo id, and the original checkpoint's mm_vision_tower fetched by repo id."""
    import json

    tower_id = json.loads((fixture_dir("llava15_orig") / "config.json").read_text())[
        "mm_vision_tower"
    ]
    with FakeHub() as hub:
        hub.add_repo("tiny/llava15-orig", _files(fixture_dir("llava15_orig")), lfs_min_size=1000)
        hub.add_repo(tower_id, _files(CLIP_TOWER), lfs_min_size=1000)
        patch_endpoint(monkeypatch, hub.url)
        res = convert("tiny/llava15-orig", outdir=tmp_path, quant="f32", vision_quant="f32")
        assert res.name == "llava15-orig"
        assert res.source["repo"] == "tiny/llava15-orig"
        assert res.source["vision_tower"] == tower_id
        weights = [r for r in hub.downloads() if r[1].endswith(".safetensors")]
        assert len(weights) == 2  # the checkpoint's and the tower's

        with pytest.raises(NotFoundError, match="neither a local folder"):
            convert("tiny/does-not-exist", outdir=tmp_path / "x")
        assert not (tmp_path / "x").exists()


def test_damaged_download_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub() as hub:
        hub.add_repo("tiny/llava15-hf", _files(fixture_dir("llava15_hf")), lfs_min_size=1000)
        hub.corrupt.add("model.safetensors")
        patch_endpoint(monkeypatch, hub.url)
        with pytest.raises(CorruptFileError, match="sha256 mismatch"):
            convert("tiny/llava15-hf", outdir=tmp_path / "out", quant="f32")
        assert not (tmp_path / "out").exists()
        hub.corrupt.clear()
        res = convert("tiny/llava15-hf", outdir=tmp_path / "out", quant="f32")  # downloads again
        assert res.model_path.is_file()


def test_store_family_names_every_llava_layout_llava_and_keeps_the_others() -> None:
    from mmchat.cli.convert import store_family

    for fam in ("llava-hf", "llava-next-hf", "llava-original", "bakllava-original"):
        assert store_family(fam) == "llava"
    for fam in ("blip2", "instructblip", "minigpt4", "nvlm_d", "neva", "idefics"):
        assert store_family(fam) == fam
