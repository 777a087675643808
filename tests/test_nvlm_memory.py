"""``mmchat.memory``: what a model needs (weights + KV cache + compute) against the machine,
stated by ``mmchat run`` before loading (always with --verbose, and whenever it does not fit)
and by ``mmchat show``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmchat.memory import MemoryEstimate, available_memory, describe, estimate

SRC = Path(__file__).parent / "fixtures" / "nvlm" / "nvlm_d"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from mmchat.converters import convert

    r = convert(SRC, outdir=tmp_path_factory.mktemp("mem"), quant="f32", vision_quant="f32")
    return r.model_path, r.mmproj_path


def test_estimate_counts_weights_and_the_kv_cache(files: tuple[Path, Path]) -> None:
    text, mmproj = files
    est = estimate(text, mmproj, n_ctx=1024, kv_type="f16")
    assert est.weights == text.stat().st_size + mmproj.stat().st_size
    # 2 layers x 1024 positions x 2 KV heads x (16 + 16) dims x 2 bytes
    assert est.kv_cache == 2 * 1024 * 2 * 32 * 2
    assert estimate(text, None, n_ctx=2048, kv_type="f32").kv_cache == 4 * est.kv_cache
    assert est.total == est.weights + est.kv_cache + est.compute


def test_cross_attention_models_count_their_image_keys_and_values() -> None:
    """IDEFICS / OpenFlamingo: each gated block keeps keys and values for the images the
    context holds (16 slots of n_latents rows, f16 unless the cache is f32)."""
    of = Path(__file__).parent / "fixtures" / "openflamingo" / "gguf" / "neox"
    text, mmproj = of / "text.gguf", of / "mmproj.gguf"
    plain = estimate(text, None, n_ctx=64)
    with_images = estimate(text, mmproj, n_ctx=64)
    # 2 gated blocks x (K + V) x 512 wide x 64 latents x 16 slots x 2 bytes
    assert with_images.kv_cache - plain.kv_cache == 2 * 2 * 512 * 64 * 16 * 2
    f32 = estimate(text, mmproj, n_ctx=64, kv_type="f32")
    assert f32.kv_cache - estimate(text, None, n_ctx=64, kv_type="f32").kv_cache == (
        2 * 2 * 512 * 64 * 16 * 4
    )


def test_describe_says_when_it_does_not_fit() -> None:
    est = MemoryEstimate(weights=40 * 10**9, kv_cache=2 * 10**9, compute=10**8)
    assert "needs about 42.1 GB" in describe(est, None)
    assert "will not fit" in describe(est, 8 * 10**9)
    assert "will not fit" not in describe(est, 64 * 10**9)
    avail = available_memory()
    assert avail is None or avail > 0


def test_run_states_the_memory_before_loading(files: tuple[Path, Path], tmp_path: Path) -> None:
    text, mmproj = files
    env = dict(os.environ, MMCHAT_HOME=str(tmp_path / "home"), COLUMNS="300")
    r = subprocess.run(
        [sys.executable, "-m", "mmchat", "run", str(text), "--mmproj", str(mmproj),
         "--verbose", "--max-tokens", "1", "hi"],
        capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    mem = [i for i, line in enumerate(lines) if "needs about" in line]
    load = [i for i, line in enumerate(lines) if "load duration" in line]
    assert mem and load and mem[0] < load[0]
    assert "available" in lines[mem[0]]


def test_summary_for_show() -> None:
    from mmchat.memory import summary

    est = MemoryEstimate(weights=40 * 10**9, kv_cache=2 * 10**9, compute=10**8)
    assert summary(est, 8 * 10**9, 4096) == (
        "about 42.1 GB (weights 40.0 GB, context 2.0 GB at 4096 tokens, compute 0.1 GB); "
        "8.0 GB available: will not fit in RAM"
    )


def test_show_states_memory_and_tiles(tmp_path: Path) -> None:
    env = dict(os.environ, MMCHAT_HOME=str(tmp_path / "home"), COLUMNS="300")

    def mmchat(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mmchat", *args],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    r = mmchat("convert", str(SRC), "--name", "nvlm-tiny", "--quant", "f32", "-o", "out")
    assert r.returncode == 0, r.stderr
    info = json.loads(mmchat("show", "nvlm-tiny", "--json").stdout)
    mem = info["memory"]
    assert mem["needed"] == mem["weights"] + mem["kv_cache"] + mem["compute"] > 0
    assert info["projector"]["max_tiles"] == 6
    shown = mmchat("show", "nvlm-tiny").stdout
    assert "256 per tile (1-6 tiles, + a thumbnail when > 1)" in shown
    assert "GB available" in shown
