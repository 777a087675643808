"""`mmchat serve` around the chat paths: pull (from the fake hub) and delete through the
``ollama`` client, API-key auth, the command line (subprocess), and the small parsers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from support.fakehub import FakeHub, patch_endpoint
from test_serve import IMAGE, LiveServer, make_store, start_server

from mmchat.server.errors import ApiError
from mmchat.server.images import decode_base64, decode_image_url
from mmchat.server.models import parse_keep_alive

BAK = "mys/ggml_bakllava-1"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = start_server(make_store(tmp_path_factory.mktemp("serve-admin")))
    yield srv
    srv.stop()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """The registry's ``bakllava`` repo, holding the tiny fixture model (so it can chat)."""
    from huggingface_hub import constants
    from support.models import converted

    model, mmproj = converted("llava15_hf", "f16", "f16")  # other bytes than the store's
    with FakeHub() as h:
        h.add_repo(BAK, {"ggml-model-q4_k.gguf": model, "mmproj-model-f16.gguf": mmproj})
        patch_endpoint(monkeypatch, h.url)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        yield h


# ----------------------------------------------------------------------------- pull / delete
def test_pull_streams_progress_then_the_model_chats(live: LiveServer, hub: FakeHub) -> None:
    client = live.ollama()
    events = list(client.pull("bakllava", stream=True))
    statuses = [e.status for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    downloads = [e for e in events if (e.status or "").startswith("pulling ") and e.total]
    assert downloads, statuses
    assert all(e.completed is not None and 0 <= e.completed <= e.total for e in downloads)
    assert any(e.completed == e.total for e in downloads)
    assert "bakllava:latest" in {m.model for m in client.list().models}
    r = client.chat(
        model="bakllava",
        messages=[{"role": "user", "content": "What is it?", "images": [str(IMAGE)]}],
        options={"num_predict": 3, "temperature": 0},
    )
    assert r.done
    # a second pull finds everything present; without streaming one status comes back
    assert client.pull("bakllava").status == "success"
    # delete: unloads it, removes it, and a second delete is a 404 naming it
    assert "bakllava:latest" in live.loaded()
    assert client.delete("bakllava").status == "success"
    assert "bakllava:latest" not in live.loaded()
    assert "bakllava:latest" not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("bakllava")
    assert err.value.status_code == 404 and "bakllava" in err.value.error


def test_pull_of_an_unknown_name_is_404(live: LiveServer, hub: FakeHub) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        list(live.ollama().pull("no-such-thing", stream=True))
    assert err.value.status_code == 404 and "no-such-thing" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        live.ollama().pull("hf.co/nobody/nothing-GGUF")
    assert err.value.status_code in (400, 404) and "nobody/nothing-GGUF" in err.value.error


# ----------------------------------------------------------------------------- auth
def test_api_key_is_required_when_set(tmp_path: Path) -> None:
    srv = start_server(make_store(tmp_path / "store"), api_key="sekrit")
    try:
        assert httpx.get(srv.url + "/").status_code == 200  # liveness stays open
        with pytest.raises(ollama.ResponseError) as err:
            srv.ollama().list()
        assert err.value.status_code == 401 and "API key" in err.value.error
        bad = srv.ollama(headers={"Authorization": "Bearer wrong"})
        with pytest.raises(ollama.ResponseError) as err:
            bad.list()
        assert err.value.status_code == 401
        good = srv.ollama(headers={"Authorization": "Bearer sekrit"})
        assert "tiny:latest" in {m.model for m in good.list().models}

        with pytest.raises(openai.AuthenticationError):
            srv.openai(api_key="wrong").models.list()
        r = srv.openai(api_key="sekrit").chat.completions.create(
            model="tinytext", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert r.choices[0].message.role == "assistant"
        resp = httpx.get(srv.url + "/v1/models")
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        assert resp.json()["error"]["code"] == "invalid_api_key"
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- command line
def _serve(env_extra: dict[str, str], *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.update(env_extra)
    return subprocess.Popen(
        [sys.executable, "-m", "mmchat", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_cli_serves_with_an_api_key_from_the_environment(isolated_home: Path) -> None:
    proc = _serve({"MMCHAT_API_KEY": "k3y", "MMCHAT_HOST": "127.0.0.1:0"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line and "API key required" in line, line
        url = line.split("listening on ", 1)[1].split(" ", 1)[0]
        assert httpx.get(url + "/api/version").status_code == 401
        ok = httpx.get(url + "/api/version", headers={"Authorization": "Bearer k3y"})
        assert ok.status_code == 200 and "version" in ok.json()
        assert httpx.get(url + "/api/tags", headers={"Authorization": "Bearer k3y"}).json() == {
            "models": []
        }
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    # uvicorn shuts down gracefully, then re-raises SIGTERM: "killed by SIGTERM" is clean
    assert proc.returncode in (0, -15), err
    assert "Traceback" not in err and "Warning" not in err  # loopback: no warning


def test_cli_port_in_use_is_one_line_error(isolated_home: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve({}, "--host", "127.0.0.1", "--port", str(port))
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_cli_warns_before_listening_on_a_non_loopback_address(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mmchat.cli.serve as serve_cli
    from mmchat.cli import main
    from mmchat.errors import UserError

    def refuse(host: str, port: int) -> socket.socket:  # never bind a public address here
        raise UserError(f"not binding {host}:{port} in a test")

    monkeypatch.setattr(serve_cli, "open_socket", refuse)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--host", "0.0.0.0", "--port", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "reachable from other machines" in err and "--api-key" in err
    assert "not binding 0.0.0.0:0" in err


def test_bind_warning_and_loopback() -> None:
    from mmchat.cli.serve import bind_warning, is_loopback

    for host in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host) and bind_warning(host, None) is None
    for host in ("0.0.0.0", "::", "192.168.1.7", "myhost.example"):
        assert not is_loopback(host)
        assert "--api-key" in (bind_warning(host, None) or "")
        assert "plain HTTP" in (bind_warning(host, "k") or "")


# ----------------------------------------------------------------------------- parsers
@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, 300.0),
        ("", 300.0),
        (0, 0.0),
        ("0", 0.0),
        (90, 90.0),
        (2.5, 2.5),
        ("90", 90.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        (-1, None),
        ("-1", None),
        ("-5m", None),
        (float("inf"), None),
    ],
)
def test_parse_keep_alive(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value, 300.0) == seconds  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m", "5x", "1h-3m", True, float("nan")])
def test_parse_keep_alive_refuses(value: object) -> None:
    with pytest.raises(ApiError) as err:
        parse_keep_alive(value, 300.0)  # type: ignore[arg-type]
    assert err.value.status == 400


def test_image_decoding() -> None:
    raw = IMAGE.read_bytes()
    import base64

    text = base64.b64encode(raw).decode()
    assert decode_base64(text, "img") == raw
    assert decode_base64(text.rstrip("="), "img") == raw  # missing padding
    assert decode_base64("\n".join(text[i : i + 76] for i in range(0, len(text), 76)), "i") == raw
    assert decode_base64(base64.urlsafe_b64encode(raw).decode(), "img") == raw
    assert decode_base64("data:image/png;base64," + text, "img") == raw
    assert decode_image_url("data:image/png;base64," + text, "img") == raw
    assert decode_image_url("DATA:image/png;charset=x;base64," + text, "img") == raw
    for bad, words in [
        ("", "is empty"),
        ("@@@", "not valid base64"),
        ("./cat.png", "looks like a file path"),
        ("file:///etc/passwd", "never reads files"),
        ("https://x/y.png", "does not download"),
        ("data:image/png;base64,@@", "not valid base64"),
        ("data:image/png;base64", "malformed data URI"),
    ]:
        with pytest.raises(ApiError) as err:
            decode_base64(bad, "image 1 of message 1")
        assert words in err.value.message and "image 1 of message 1" in err.value.message
    with pytest.raises(ApiError, match="not a data URI"):
        decode_image_url(text, "img")
