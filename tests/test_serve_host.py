"""Models in a process of their own (``mmchat serve --rpc``): when llama.cpp ends that
process mid-reply (as it does when an RPC worker dies), the reply ends with one clear error,
the server stays up, and the next request loads the model again.

The death is simulated by killing the model's process: what llama.cpp's abort does to it.
(``tests/test_rpc.py`` kills a real worker where llama.cpp is built with RPC.)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_serve import LiveServer, make_store, start_server

from mmchat.server.host import HostedModel


@pytest.fixture
def hosted(tmp_path: Path) -> Iterator[LiveServer]:
    srv = start_server(make_store(tmp_path), loader=partial(HostedModel, endpoints=[]))
    yield srv
    srv.stop()


def ask(srv: LiveServer, n: int = 4) -> Any:
    opts = {"temperature": 0, "num_predict": n, "seed": 1}
    return srv.ollama().chat("tinytext", [{"role": "user", "content": "Hello"}], options=opts)


def test_a_hosted_model_answers_like_an_in_process_one(hosted: LiveServer, tmp_path: Path) -> None:
    here = start_server(make_store(tmp_path / "here"))
    try:
        assert ask(hosted).message.content == ask(here).message.content
    finally:
        here.stop()
    (entry,) = hosted.manager.loaded()
    assert entry.model.hosted and entry.model._proc.pid != os.getpid()


def test_the_model_process_dying_mid_reply_is_one_error_and_the_server_lives_on(
    hosted: LiveServer,
) -> None:
    ask(hosted)  # loaded
    lines: list[dict[str, Any]] = []
    status: list[int] = []

    def stream(seed: int) -> None:
        body = {
            "model": "tinytext",
            "prompt": "Talk",
            "options": {"num_predict": 1_000_000, "temperature": 1, "seed": seed},
        }
        with httpx.stream("POST", hosted.url + "/api/generate", json=body, timeout=120) as r:
            status.append(r.status_code)
            for line in r.iter_lines():
                if line:
                    lines.append(__import__("json").loads(line))

    # a sampled reply of the tiny model may end on its own (end of generation) within a few
    # tokens: such an attempt says nothing about a death mid-reply, so try another seed
    for seed in range(1, 9):
        lines.clear()
        status.clear()
        t = threading.Thread(target=stream, args=(seed,))
        t.start()
        deadline = time.monotonic() + 60
        while len(lines) < 3 and t.is_alive():  # the reply is streaming
            assert time.monotonic() < deadline, lines[-3:]
            time.sleep(0.01)
        if not t.is_alive() or lines[-1].get("done"):
            t.join()
            continue
        (entry,) = hosted.manager.loaded()  # the process serving this reply
        pid = entry.model._proc.pid
        os.kill(pid, signal.SIGKILL)  # what llama.cpp's abort does to the process
        t.join(timeout=60)
        if "error" not in lines[-1] and lines[-1].get("done_reason") == "stop":
            continue  # it ended on its own just before the kill; the next request reloads
        break
    else:
        pytest.fail("every sampled reply ended on its own before the process could be killed")
    assert status == [200]
    assert "error" in lines[-1] and "the model's process ended" in lines[-1]["error"]
    # the server is up, and the next request loads the model again in a new process
    r = ask(hosted)
    assert r.done
    (entry,) = hosted.manager.loaded()
    assert entry.model._proc.pid != pid


def test_load_failures_in_the_child_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    from mmchat.errors import UserError
    from mmchat.runtime import LoadOptions

    with pytest.raises(UserError) as err:
        HostedModel(bad, None, LoadOptions(n_ctx=256, n_threads=1))
    assert "\n" not in str(err.value)
