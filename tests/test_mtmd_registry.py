"""The registry path a new user takes, per family: ``mmchat run NAME "…? ./img.png"`` pulls the
model from the (fake) hub under the real ggml-org repo and file names, then answers about the
image, as a real process. Also a one-shot with two images, and audio with ``--audio``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fakehub import FakeHub, env_for_subprocess
from test_mtmd_families import AUDIO, FAMILIES, SQUARE, TONE, VISION, WIDE, files

# registry name -> (fixture family, repo, text file, projector file): the real layouts of
# the ggml-org repos the built-in registry names
REGISTRY = {
    "gemma3": (
        "gemma3",
        "ggml-org/gemma-3-4b-it-GGUF",
        "gemma-3-4b-it-Q4_K_M.gguf",
        "mmproj-model-f16.gguf",
    ),
    "qwen2.5-vl": (
        "qwen25vl",
        "ggml-org/Qwen2.5-VL-3B-Instruct-GGUF",
        "Qwen2.5-VL-3B-Instruct-Q4_K_M.gguf",
        "mmproj-Qwen2.5-VL-3B-Instruct-f16.gguf",
    ),
    "smolvlm": (
        "smolvlm",
        "ggml-org/SmolVLM-500M-Instruct-GGUF",
        "SmolVLM-500M-Instruct-Q8_0.gguf",
        "mmproj-SmolVLM-500M-Instruct-f16.gguf",
    ),
    "internvl3": (
        "internvl",
        "ggml-org/InternVL3-1B-Instruct-GGUF",
        "InternVL3-1B-Instruct-Q8_0.gguf",
        "mmproj-InternVL3-1B-Instruct-Q8_0.gguf",
    ),
    "pixtral": (
        "mistral3",
        "ggml-org/pixtral-12b-GGUF",
        "pixtral-12b-Q4_K_M.gguf",
        "mmproj-pixtral-12b-f16.gguf",
    ),
}
AVAILABLE = sorted(n for n, v in REGISTRY.items() if v[0] in FAMILIES)


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with FakeHub() as h:
        for _name, (family, repo, text, proj) in REGISTRY.items():
            if family in FAMILIES:
                model, mmproj = files(family)
                h.add_repo(repo, {text: model, proj: mmproj, "README.md": b"# test\n"})
        yield h


def mmchat(
    *args: str, home: Path, hub: FakeHub | None = None, cwd: Path
) -> subprocess.CompletedProcess[str]:
    env = env_for_subprocess(hub.url) if hub is not None else dict(__import__("os").environ)
    env["MMCHAT_HOME"] = str(home)
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "mmchat", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def greedy(family: str, text: str) -> str:
    """What the runtime itself answers (temperature 0, 4 tokens), to compare with the CLI."""
    from mmchat.runtime import LoadOptions, SamplingParams
    from mmchat.runtime.loader import load_model
    from mmchat.vision import load_image

    with load_model(*files(family), LoadOptions()) as lm:
        chat = lm.session(params=SamplingParams(temperature=0, max_tokens=4))
        return chat.ask(text, [load_image(SQUARE)]).text


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copy(SQUARE, tmp_path / "square.png")
    shutil.copy(WIDE, tmp_path / "wide.png")
    shutil.copy(TONE, tmp_path / "tone.wav")
    return tmp_path


@pytest.mark.parametrize("name", AVAILABLE)
def test_run_pulls_from_the_registry_and_sees(hub: FakeHub, workdir: Path, name: str) -> None:
    home = workdir / "home"
    r = mmchat(
        "run",
        name,
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "What is in this image? ./square.png",
        home=home,
        hub=hub,
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr
    assert "Added image './square.png' (64×64" in r.stderr
    assert r.stdout.strip() == greedy(REGISTRY[name][0], "What is in this image?").strip()
    # pulled into the store under the registry name, from the repo's real file names
    listed = mmchat("list", "--json", home=home, cwd=workdir)
    assert name in listed.stdout


@pytest.mark.parametrize("family", VISION)
def test_one_shot_with_two_images(workdir: Path, family: str) -> None:
    model, mmproj = files(family)
    r = mmchat(
        "run",
        str(model),
        "--mmproj",
        str(mmproj),
        "--ctx",
        "4096",
        "--max-tokens",
        "3",
        "Compare ./square.png and ./wide.png",
        home=workdir / "home",
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("Added image") == 2


@pytest.mark.parametrize("family", AUDIO)
def test_one_shot_with_audio(workdir: Path, family: str) -> None:
    model, mmproj = files(family)
    r = mmchat(
        "run",
        str(model),
        "--mmproj",
        str(mmproj),
        "--max-tokens",
        "3",
        "What is this sound? ./tone.wav",
        home=workdir / "home",
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr
    assert "Added audio './tone.wav'" in r.stderr
    not_audio = mmchat(
        "run",
        str(model),
        "--mmproj",
        str(mmproj),
        "--audio",
        "square.png",
        "Hear it",
        home=workdir / "home",
        cwd=workdir,
    )
    assert not_audio.returncode == 2
    assert "not an audio file" in not_audio.stderr
    assert len(not_audio.stderr.strip().splitlines()) <= 2
