"""`mmchat pull/list/show/rm/cp/create` through the CLI (CliRunner, and real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fakehub import FakeHub, patch_endpoint, write_mmproj_gguf, write_text_gguf
from typer.testing import CliRunner

from mmchat.cli import app
from mmchat.errors import UserError
from mmchat.store import open_store

BAK = "mys/ggml_bakllava-1"
MODEL, MMPROJ = "ggml-model-q4_k.gguf", "mmproj-model-f16.gguf"


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli-ggufs")
    return {
        "text": write_text_gguf(d / "text.gguf", chat_template="{{ bos_token }}"),
        "big": write_text_gguf(d / "big.gguf", seed=9, pad_bytes=600_000),
        "wide": write_text_gguf(d / "wide.gguf", n_embd=96),
        "mmproj": write_mmproj_gguf(d / "mmproj.gguf"),
        "audio": write_mmproj_gguf(d / "audio.gguf", audio=True, seed=4),
    }


@pytest.fixture
def hub(ggufs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub() as h:
        h.add_repo(BAK, {MODEL: ggufs["big"], MMPROJ: ggufs["mmproj"]})
        patch_endpoint(monkeypatch, h.url)
        yield h


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


class Result:
    def __init__(self, code: int, out: str, error: str | None) -> None:
        self.code, self.out, self.error = code, out, error


def cli(*args: str) -> Result:
    """Invoke the app in-process; a UserError becomes exit 2 as in mmchat.cli.main."""
    res = CliRunner().invoke(app, list(args))
    if isinstance(res.exception, UserError):
        return Result(2, res.stdout, str(res.exception))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return Result(res.exit_code, res.stdout, None)


def create(name: str, model: Path, mmproj: Path | None = None, *extra: str) -> Result:
    args = ["create", name, "--model", str(model)]
    if mmproj is not None:
        args += ["--mmproj", str(mmproj)]
    return cli(*args, *extra)


# ---------------------------------------------------------------------------- create
def test_create_then_list_and_show(ggufs: dict[str, Path], tmp_path: Path) -> None:
    tpl = tmp_path / "chat.jinja"
    tpl.write_text("{% for m in messages %}USER: {{ m.content }}\n{% endfor %}ASSISTANT:")
    r = create(
        "My-Llava:v1",
        ggufs["text"],
        ggufs["mmproj"],
        "--template",
        str(tpl),
        "--param",
        "temperature=0.1",
        "--param",
        "stop=USER:",
        "--license",
        "mit",
    )
    assert r.code == 0, r.error
    assert "created my-llava:v1" in r.out
    assert create("voice", ggufs["text"], ggufs["audio"]).code == 0
    assert create("textonly", ggufs["text"]).code == 0

    r = cli("list")
    assert r.code == 0
    lines = r.out.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "FAMILY", "QUANT", "VISION/AUDIO", "MODIFIED"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"my-llava:v1", "voice:latest", "textonly:latest"}
    assert rows["my-llava:v1"][4:7] == ["llama", "Q4_K_M", "vision"]
    assert rows["voice:latest"][6] == "audio" and rows["textonly:latest"][6] == "-"
    assert "just now" in lines[1]

    data = json.loads(cli("list", "--json").out)
    by_name = {d["name"]: d for d in data}
    mine = by_name["my-llava:v1"]
    assert mine["capabilities"] == ["vision"] and mine["quant"] == "Q4_K_M"
    assert mine["size"] == ggufs["text"].stat().st_size + ggufs["mmproj"].stat().st_size
    assert len(mine["id"]) == 12 and mine["parts"]["model"].startswith("sha256:")

    r = cli("show", "my-llava:v1")
    assert r.code == 0
    for needle in (
        "architecture        llama",
        "context length      2048",
        "embedding length    64",
        "quantization        Q4_K_M",
        "projector type      mlp",
        "image size          336",
        "tokens per image    576",
        "custom",
        "USER:",
        "temperature",
        "mit",
        "text.gguf",
        "mmproj.gguf",
    ):
        assert needle in r.out, (needle, r.out)

    info = json.loads(cli("show", "MY-LLAVA:V1", "--json").out)
    assert info["model"]["architecture"] == "llama"
    assert info["model"]["context_length"] == 2048
    assert info["projector"]["projector_type"] == "mlp"
    assert info["projector"]["tokens_per_image"] == 576
    assert info["projector"]["image_size"] == 336
    assert info["template"]["kind"] == "custom"
    assert info["parameters"] == {"temperature": 0.1, "stop": ["USER:"]}
    assert info["license"] == "mit"
    assert Path(info["model"]["path"]).exists()
    # The GGUF's own chat template is reported when there is no custom one.
    assert json.loads(cli("show", "textonly", "--json").out)["template"]["kind"] == "gguf"
    assert json.loads(cli("show", "textonly", "--json").out)["projector"] is None


@pytest.mark.parametrize(
    ("model", "mmproj", "extra", "message"),
    [
        ("mmproj", None, [], "is a projector"),
        ("text", "text", [], "not a projector"),
        ("wide", "mmproj", [], "outputs width 64 but the text model"),
        ("junk", None, [], "is not a GGUF file"),
        ("absent", None, [], "No such file"),
        ("text", "mmproj", ["--param", "colour=red"], "Unknown parameter 'colour'"),
        ("text", "mmproj", ["--param", "num_ctx=lots"], "must be an integer"),
        ("text", "mmproj", ["--template", "bad.jinja"], "line 1"),
    ],
)
def test_create_validation_errors(
    ggufs: dict[str, Path],
    tmp_path: Path,
    model: str,
    mmproj: str | None,
    extra: list[str],
    message: str,
) -> None:
    (tmp_path / "junk").write_text("hello")
    (tmp_path / "bad.jinja").write_text("{% if %}")
    paths = {**ggufs, "junk": tmp_path / "junk", "absent": tmp_path / "absent.gguf"}
    extra = [str(tmp_path / e) if e.endswith(".jinja") else e for e in extra]
    r = create("x", paths[model], paths[mmproj] if mmproj else None, *extra)
    assert r.code == 2 and r.error is not None and message in r.error, r.error
    assert open_store().list_models() == []
    assert not open_store().blobs_dir.exists() or not any(open_store().blobs_dir.iterdir())


def test_bad_names_and_missing_models() -> None:
    for args in (["show", "../../etc/passwd"], ["rm", "a/b"], ["create", "/abs", "--model", "x"]):
        r = cli(*args)
        assert r.code == 2 and r.error is not None and "Invalid model name" in r.error
    r = cli("show", "nothing")
    assert r.code == 2 and r.error is not None and "mmchat pull nothing:latest" in r.error


# ---------------------------------------------------------------------------- rm / cp
def test_cp_and_rm(ggufs: dict[str, Path]) -> None:
    assert create("a", ggufs["text"], ggufs["mmproj"]).code == 0
    r = cli("cp", "a", "b:copy")
    assert r.code == 0 and "copied to b:copy" in r.out
    ids = {d["name"]: d["id"] for d in json.loads(cli("list", "--json").out)}
    assert ids["a:latest"] == ids["b:copy"]
    r = cli("rm", "a", "missing")
    assert r.code == 2 and r.error is not None and "missing" in r.error
    assert "deleted a:latest (freed 0 B)" in r.out  # b:copy still uses both files
    assert open_store().resolve("b:copy").model_path.exists()
    r = cli("rm", "b:copy")
    assert r.code == 0 and "freed" in r.out
    assert not any(open_store().blobs_dir.iterdir())
    assert json.loads(cli("list", "--json").out) == []


# ---------------------------------------------------------------------------- pull
def test_pull_dry_run_prints_plan_and_downloads_nothing(
    hub: FakeHub, ggufs: dict[str, Path]
) -> None:
    r = cli("pull", "bakllava", "--dry-run")
    assert r.code == 0, r.error
    assert f"pulling bakllava:latest from hf.co/{BAK}" in r.out
    assert MODEL in r.out and MMPROJ in r.out
    assert "total " in r.out and "to download" in r.out
    assert hub.downloads() == [] and sum(hub.bytes_served.values()) == 0
    assert open_store().list_models() == []


def test_pull_then_list(hub: FakeHub, ggufs: dict[str, Path]) -> None:
    r = cli("pull", "BakLLaVA")
    assert r.code == 0, r.error
    assert "success: bakllava:latest" in r.out
    data = json.loads(cli("list", "--json").out)
    assert [d["name"] for d in data] == ["bakllava:latest"]
    assert data[0]["family"] == "llava" and data[0]["capabilities"] == ["vision"]
    r = cli("pull", "hf.co/nobody/none-GGUF")
    assert r.code == 2 and r.error is not None and "nobody/none-GGUF not found" in r.error


def test_pull_offline_with_model_present_makes_no_request(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("pull", "bakllava").code == 0
    hub.reset_counters()
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = cli("pull", "bakllava")
    assert r.code == 0 and "offline" in r.out
    assert cli("show", "bakllava").code == 0
    assert hub.requests == []


# ---------------------------------------------------------------------------- real processes
def _mmchat(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mmchat", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.slow
def test_two_processes_pull_the_same_model_once(
    hub: FakeHub, ggufs: dict[str, Path], isolated_home: Path
) -> None:
    """Two terminals: HF_ENDPOINT honoured in a fresh process, one download, one store."""
    hub.chunk_delay = 0.02  # ~0.2 s for the model: the second process has to wait
    env = dict(os.environ, HF_ENDPOINT=hub.url, COLUMNS="200")
    procs = [_mmchat("pull", "bakllava", env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stdout + stderr
        assert "success: bakllava:latest" in stdout
    assert hub.bytes_served[MODEL] == ggufs["big"].stat().st_size
    assert len(hub.downloads(MODEL)) == 1
    rec = open_store(isolated_home).resolve("bakllava")
    assert rec.model_path.read_bytes() == ggufs["big"].read_bytes()

    # A user error in a real process: one red line on stderr, exit 2.
    bad = _mmchat("pull", "hf.co/../x", env=env)
    stdout, stderr = bad.communicate(timeout=60)
    assert bad.returncode == 2
    assert stderr.strip().startswith("Error: Invalid model name") and len(stderr.splitlines()) == 1
