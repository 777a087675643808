"""`mmchat ps` and `mmchat stop` against a real running server (found through MMCHAT_HOST)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from test_serve import GREEDY, LiveServer, make_store, start_server
from typer.testing import CliRunner

from mmchat.cli import app
from mmchat.errors import UserError

runner = CliRunner()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = start_server(make_store(tmp_path_factory.mktemp("cli-ps")), api_key="sesame")
    yield srv
    srv.stop()


@pytest.fixture
def env(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> LiveServer:
    monkeypatch.setenv("MMCHAT_HOST", live.url.removeprefix("http://"))
    monkeypatch.setenv("MMCHAT_API_KEY", "sesame")
    return live


def test_ps_lists_loaded_models_and_stop_unloads(env: LiveServer) -> None:
    client = env.ollama(headers={"Authorization": "Bearer sesame"})
    client.generate(model="tinytext", prompt="hi", options=GREEDY, keep_alive="10m")
    r = runner.invoke(app, ["ps"])
    assert r.exit_code == 0, r.output
    header, row = r.output.splitlines()[:2]
    assert header.split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert row.startswith("tinytext:latest") and "100% CPU" in row and "1024" in row
    assert "minutes from now" in row
    as_json = json.loads(runner.invoke(app, ["ps", "--json"]).output)
    assert [m["name"] for m in as_json] == ["tinytext:latest"]

    r = runner.invoke(app, ["stop", "tinytext"])
    assert r.exit_code == 0, r.output
    assert "tinytext:latest" not in env.loaded()
    assert len(runner.invoke(app, ["ps"]).output.strip().splitlines()) == 1  # header only
    again = runner.invoke(app, ["stop", "tinytext"])
    assert again.exit_code == 0 and "is not running" in again.output
    assert "tinytext:latest" not in env.loaded()  # stop never loads a model
    missing = runner.invoke(app, ["stop", "nosuchmodel"])
    assert isinstance(missing.exception, UserError)
    assert "couldn't find model 'nosuchmodel' to stop" in str(missing.exception)


def test_errors_name_the_problem(env: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMCHAT_API_KEY", "wrong")
    r = runner.invoke(app, ["ps"])
    assert isinstance(r.exception, UserError) and "invalid API key" in str(r.exception)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MMCHAT_HOST", f"127.0.0.1:{port}")
    r = runner.invoke(app, ["stop", "tinytext"])
    assert isinstance(r.exception, UserError)
    assert "could not reach mmchat serve" in str(r.exception) and "is it running" in str(
        r.exception
    )
