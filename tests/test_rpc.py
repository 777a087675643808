"""Across machines on llama.cpp's RPC backend (issue 19, DESIGN §9).

The probe speaks the RPC protocol in Python, so its errors are tested everywhere against
small fake workers. Everything that needs ggml's RPC backend (real workers, a model split
over them) skips with the reinstall line where llama.cpp was built without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mmchat.errors import UserError
from mmchat.runtime import rpc
from mmchat.runtime.options import LoadOptions
from mmchat.settings import load_settings

HAVE_RPC = rpc.rpc_available()
needs_rpc = pytest.mark.skipif(not HAVE_RPC, reason=rpc.NO_RPC_MESSAGE)
MMCHAT = [sys.executable, "-m", "mmchat"]


# --- endpoints, settings, options (no llama.cpp RPC needed) ---------------------------------


def test_parse_endpoints() -> None:
    eps = rpc.parse_endpoints(" 10.0.0.2:50052, gpu-box ,127.0.0.1:6000")
    assert [str(e) for e in eps] == ["10.0.0.2:50052", "gpu-box:50052", "127.0.0.1:6000"]
    assert rpc.parse_endpoints(None) == [] and rpc.parse_endpoints(" ") == []
    for bad, why in (
        ("host:abc", "port must be a number"),
        ("host:0", "between 1 and 65535"),
        ("[::1]:50052", "IPv6"),
        (":50052", "no host"),
        ("a:1,a:1", "listed twice"),
    ):
        with pytest.raises(UserError, match=why):
            rpc.parse_endpoints(bad)


def test_settings_and_tensor_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMCHAT_RPC", " 10.0.0.2:50052 ")
    assert load_settings().rpc == "10.0.0.2:50052"
    monkeypatch.delenv("MMCHAT_RPC")
    assert load_settings().rpc is None
    LoadOptions(tensor_split=(3.0, 1.0)).validate()
    for bad in ((), (-1.0, 2.0), (0.0, 0.0), (float("nan"),)):
        with pytest.raises(UserError, match="tensor split"):
            LoadOptions(tensor_split=bad).validate()
    from mmchat.cli.rpc import parse_tensor_split, use_workers

    assert parse_tensor_split("3,1") == (3.0, 1.0)
    with pytest.raises(UserError, match="--tensor-split"):
        parse_tensor_split("3;1")
    if not any(d.type in ("GPU", "iGPU") for d in rpc.local_devices()):
        with pytest.raises(UserError, match=r"2 shares but there are 0 devices .* \(none: add"):
            use_workers(None, "1,1", LoadOptions())


# --- the probe against fake workers ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fake_worker() -> Iterator[Callable[[Callable[[socket.socket], None]], rpc.Endpoint]]:
    """A listening socket on loopback whose one connection is handled by ``serve``."""
    socks: list[socket.socket] = []

    def start(serve: Callable[[socket.socket], None]) -> rpc.Endpoint:
        srv = socket.create_server(("127.0.0.1", 0))
        socks.append(srv)

        def loop() -> None:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                serve(conn)

        threading.Thread(target=loop, daemon=True).start()
        return rpc.Endpoint("127.0.0.1", srv.getsockname()[1])

    yield start
    for s in socks:
        s.close()


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def _answer(conn: socket.socket, payload: bytes) -> None:
    conn.sendall(struct.pack("<Q", len(payload)) + payload)


def _speak(version: tuple[int, int, int], memories: list[tuple[int, int]]) -> Callable:
    def serve(conn: socket.socket) -> None:
        while True:
            cmd, size = struct.unpack("<BQ", _read(conn, 9))
            body = _read(conn, size)
            if cmd == 14:
                assert size == 24
                _answer(conn, bytes(version) + b"\0" + bytes(24))
            elif cmd == 15:
                _answer(conn, struct.pack("<I", len(memories)))
            elif cmd == 11:
                (i,) = struct.unpack("<I", body)
                _answer(conn, struct.pack("<QQ", *memories[i]))
            else:
                return

    return serve


def test_probe_reads_version_and_device_memory(fake_worker) -> None:  # type: ignore[no-untyped-def]
    ep = fake_worker(_speak((7, 0, 0), [(3 << 30, 4 << 30), (1 << 20, 2 << 20)]))
    info = rpc.probe(ep, timeout=5)
    assert info.version == "7.0.0" and info.endpoint == str(ep)
    assert [(d.index, d.memory_free, d.memory_total) for d in info.devices] == [
        (0, 3 << 30, 4 << 30),
        (1, 1 << 20, 2 << 20),
    ]


def test_probe_refuses_another_protocol_version(fake_worker) -> None:  # type: ignore[no-untyped-def]
    ep = fake_worker(_speak((6, 1, 0), [(1, 1)]))
    with pytest.raises(rpc.RpcError, match=r"speaks RPC protocol 6\.1\.0, this llama\.cpp"):
        rpc.probe(ep, timeout=5)


def test_probe_unreachable_silent_and_wrong_server(fake_worker) -> None:  # type: ignore[no-untyped-def]
    closed = rpc.Endpoint("127.0.0.1", _free_port())
    with pytest.raises(rpc.RpcError, match="is unreachable") as exc:
        rpc.probe(closed, timeout=2)
    assert "\n" not in str(exc.value) and "mmchat rpc-worker" in str(exc.value)

    silent = fake_worker(lambda conn: time.sleep(3))
    t0 = time.monotonic()
    with pytest.raises(rpc.RpcError, match=r"did not answer within 0\.5 s"):
        rpc.probe(silent, timeout=0.5)
    assert time.monotonic() - t0 < 2.5

    def http(conn: socket.socket) -> None:
        conn.recv(64)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    with pytest.raises(rpc.RpcError, match=r"not a working llama\.cpp RPC worker"):
        rpc.probe(fake_worker(http), timeout=2)


def test_doctor_reports_rpc_and_unreachable_worker() -> None:
    from mmchat import doctor

    port = _free_port()
    report = doctor.collect(rpc=f"127.0.0.1:{port}")
    assert report.rpc_available is HAVE_RPC
    assert report.rpc_workers[0]["endpoint"] == f"127.0.0.1:{port}"
    assert "unreachable" in report.rpc_workers[0]["error"]
    assert any("unreachable" in p for p in report.problems)


# --- without RPC in llama.cpp: one clear line ------------------------------------------------


@pytest.mark.skipif(HAVE_RPC, reason="this llama.cpp has RPC")
def test_without_rpc_every_entry_point_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(rpc.RpcError) as exc:
        rpc.attach([rpc.Endpoint("127.0.0.1", 1)])
    assert str(exc.value) == rpc.NO_RPC_MESSAGE
    for args in (["rpc-worker"], ["run", "x", "hi", "--rpc", "127.0.0.1:1"]):
        proc = subprocess.run(
            MMCHAT + args, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
        )
        assert proc.returncode == 2, proc.stderr
        assert "built without RPC" in proc.stderr and "-DGGML_RPC=on" in proc.stderr
        assert "Traceback" not in proc.stderr


# --- real workers (llama.cpp built with -DGGML_RPC=on) ---------------------------------------


class Worker:
    def __init__(self, port: int, threads: int = 1) -> None:
        self.port = port
        self.endpoint = f"127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [*MMCHAT, "rpc-worker", "--port", str(port), "--threads", str(threads)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        self.banner = ""
        deadline = time.monotonic() + 60
        while "serving" not in self.banner and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.banner += line
        assert "serving" in self.banner, self.banner

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        rest, _ = self.proc.communicate(timeout=20)
        return self.proc.returncode, rest


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started = [Worker(_free_port()), Worker(_free_port())]
    yield started
    for w in started:
        try:
            w.stop()  # Ctrl-C: the worker stops its server process too
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


@needs_rpc
def test_worker_serves_probes_and_stops_on_ctrl_c(workers: list[Worker]) -> None:
    w = workers[0]
    assert f"on {w.endpoint}" in w.banner and "CPU" in w.banner and "protocol 7." in w.banner
    info = rpc.probe(w.endpoint)
    assert len(info.devices) == 1 and info.devices[0].memory_total > 0
    proc = subprocess.run(
        [*MMCHAT, "doctor", "--json", "--rpc", ",".join(x.endpoint for x in workers)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(proc.stdout)
    assert report["rpc_available"] is True
    assert [x["endpoint"] for x in report["rpc_workers"]] == [x.endpoint for x in workers]
    assert all(x["devices"][0]["memory_total"] > 0 for x in report["rpc_workers"])
    taken = subprocess.run(
        [*MMCHAT, "rpc-worker", "--port", str(w.port)], capture_output=True, text=True, timeout=60
    )
    assert taken.returncode == 2 and f"cannot listen on {w.endpoint}" in taken.stderr
    assert "serving" not in taken.stdout
    code, rest = w.stop()
    assert code == 0 and "rpc-worker stopped" in rest
    with pytest.raises(rpc.RpcError, match="unreachable"):
        rpc.probe(w.endpoint, timeout=2)


SPLIT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from dataclasses import replace
    import numpy as np
    from mmchat.runtime import LoadOptions, SamplingParams, load_model
    from mmchat.runtime import rpc

    model_path, endpoints, bad = sys.argv[1], sys.argv[2], sys.argv[3]
    ids = [1, 15, 27, 99, 3, 42, 7]

    def run(opts):
        with load_model(model_path, options=opts) as m:
            logits = m.evaluate_ids([ids]).logits
            s = m.session(params=SamplingParams(temperature=0, max_tokens=12, seed=1))
            return logits, s.ask("hello there").text

    base = LoadOptions.parity(n_threads=1)
    local_logits, local_text = run(base)
    try:  # an unreachable worker: one clear error, this process goes on
        rpc.attach(rpc.parse_endpoints(bad), timeout=2)
        bad_error = None
    except rpc.RpcError as exc:
        bad_error = str(exc)
    infos = rpc.attach(rpc.parse_endpoints(endpoints))
    # 2 of 3 offloadable parts (layer 1 + output) on the workers, layer 0 stays local
    split = replace(base, n_gpu_layers=2, tensor_split=(1.0, 1.0), verbose=True)
    split_logits, split_text = run(split)
    devices = [d.name for d in rpc.local_devices() if d.is_rpc]
    print(json.dumps({
        "max_abs": float(np.max(np.abs(local_logits - split_logits))),
        "argmax": [int(np.argmax(local_logits)), int(np.argmax(split_logits))],
        "texts": [local_text, split_text],
        "bad_error": bad_error,
        "devices": devices,
        "workers": [i.endpoint for i in infos],
    }))
    """
)


@needs_rpc
def test_model_split_over_two_workers_matches_local(workers: list[Worker]) -> None:
    from support.models import converted

    model, _ = converted("llava15_hf")
    endpoints = ",".join(w.endpoint for w in workers)
    bad = f"127.0.0.1:{_free_port()}"
    proc = subprocess.run(
        [sys.executable, "-c", SPLIT_SCRIPT, str(model), endpoints, bad],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == ["RPC0", "RPC1"]
    assert result["bad_error"] and "unreachable" in result["bad_error"]
    assert result["max_abs"] < 1e-4, result
    assert result["argmax"][0] == result["argmax"][1]
    assert result["texts"][0] == result["texts"][1]
    # llama.cpp's load log: weights were placed on both workers and on this machine
    placed = [ln for ln in proc.stderr.splitlines() if "model buffer size" in ln]
    for name in [w.endpoint for w in workers] + ["CPU"]:
        assert any(name in ln for ln in placed), placed


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from mmchat.runtime import LoadOptions, SamplingParams, load_model
    from mmchat.runtime import rpc

    model_path, endpoint, worker_pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rpc.attach(rpc.parse_endpoints(endpoint))
    m = load_model(model_path, options=LoadOptions(n_threads=1, n_gpu_layers=-1))
    s = m.session(params=SamplingParams(temperature=0, max_tokens=100000))
    for n, _ in enumerate(s.send("hello")):
        if n == 10:
            os.kill(worker_pid, signal.SIGKILL)
            print("killed", flush=True)
    print("finished", flush=True)
    """
)


@needs_rpc
def test_worker_killed_mid_reply_ends_the_process_with_one_clear_line(
    workers: list[Worker],
) -> None:
    """Today's limit (README "Limits today"): ggml aborts the process that owns the
    context when a worker dies; mmchat turns ggml's backtrace into one line."""
    from support.models import converted

    model, _ = converted("llava15_hf")
    w = workers[0]
    # `mmchat rpc-worker` is a parent; its child process runs ggml's server
    children = Path(f"/proc/{w.proc.pid}/task/{w.proc.pid}/children")
    if not children.is_file():
        pytest.skip("needs /proc to find the worker's server process")
    server = int(children.read_text().split()[0])
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(model), w.endpoint, str(server)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "killed" in proc.stdout and "finished" not in proc.stdout
    assert proc.returncode == -signal.SIGABRT
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"Error: lost an RPC worker ({w.endpoint})")


class Relay:
    """127.0.0.1:port → a worker, counting the bytes the client sends."""

    def __init__(self, target: int) -> None:
        self.sent = 0
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.srv.getsockname()[1]}"
        self.target = target
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if count:
                    self.sent += len(data)
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


VISION_SCRIPT = textwrap.dedent(
    """
    import sys
    from mmchat.runtime import LoadOptions, load_model
    from mmchat.runtime import rpc

    model, mmproj, endpoint, device = sys.argv[1:5]
    rpc.attach(rpc.parse_endpoints(endpoint))
    device = rpc.vision_device() if device == "auto" else None
    opts = LoadOptions(n_threads=1, n_gpu_layers=0, vision_device=device)
    with load_model(model, mmproj, opts) as m:
        print("vision device", device, m.vision is not None, flush=True)
    """
)


@needs_rpc
def test_vision_encoder_stays_local(workers: list[Worker]) -> None:
    """mtmd puts its encoder on the first GPU-type device, and RPC devices are GPU-type:
    without a local GPU the CLI pins it to the CPU (``rpc.vision_device``). Measured by the
    bytes sent to the worker while the mtmd projector (about 1 MB) loads; the text layers
    stay local (``n_gpu_layers=0``)."""
    if rpc.vision_device() != "cpu":
        pytest.skip("a local GPU is present: the encoder takes it before any RPC device")
    fixture = Path(__file__).parent / "fixtures" / "mtmd" / "smolvlm"
    sent = {}
    for mode in ("auto", "unpinned"):
        relay = Relay(workers[0].port)
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                VISION_SCRIPT,
                str(fixture / "model.gguf"),
                str(fixture / "mmproj.gguf"),
                relay.endpoint,
                mode,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        time.sleep(0.3)
        sent[mode] = relay.sent
        relay.srv.close()
    size = (fixture / "mmproj.gguf").stat().st_size
    assert sent["unpinned"] > size // 2, sent  # the proof that the measurement sees it
    assert sent["auto"] < size // 20, sent


@needs_rpc
def test_cli_run_with_rpc_answers_like_local(workers: list[Worker]) -> None:
    from support.models import converted

    model, mmproj = converted("llava15_hf")
    image = Path(__file__).parent / "fixtures" / "images" / "landscape.png"
    base = [*MMCHAT, "run", str(model), "--mmproj", str(mmproj), "--temperature", "0"]
    base += ["--max-tokens", "10", "--plain", "--image", str(image), "Describe it."]
    answers = []
    for extra in ([], ["--rpc", ",".join(w.endpoint for w in workers), "--verbose"]):
        proc = subprocess.run(
            base + extra, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        answers.append(proc.stdout)
    assert answers[0] == answers[1] and answers[0].strip()
    assert "RPC workers: " + workers[0].endpoint in proc.stderr.replace("\n", "")
    # three shares for two devices: refused before the model loads
    proc = subprocess.run(
        [*base, "--rpc", ",".join(w.endpoint for w in workers), "--tensor-split", "1,1,1"],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2 and "3 shares but there are 2 devices" in proc.stderr


@needs_rpc
def test_busy_worker_is_a_clear_error(workers: list[Worker]) -> None:
    """A worker serves one client at a time: while another client holds it, the probe
    times out with a message that says so (instead of ggml blocking or aborting)."""
    w = workers[0]
    with socket.create_connection(("127.0.0.1", w.port), timeout=5) as held:
        held.sendall(struct.pack("<BQ", 14, 24) + bytes(24))  # HELLO: now it serves us
        assert len(_read(held, 8 + 28)) == 36
        with pytest.raises(rpc.RpcError, match="serving another client"):
            rpc.probe(w.endpoint, timeout=1)
    time.sleep(0.2)
    assert rpc.probe(w.endpoint).version.startswith("7.")


@needs_rpc
def test_serve_survives_a_worker_dying_mid_reply(workers: list[Worker], tmp_path: Path) -> None:
    """`mmchat serve --rpc` keeps each model in a process of its own: the worker's death
    ends that process (llama.cpp aborts) and the reply with one error; the server answers
    the next request (an error while the worker is down, the model once it is back)."""
    from functools import partial

    import httpx
    from support.models import converted
    from test_serve import start_server

    from mmchat.server.host import HostedModel
    from mmchat.store import Store

    model, _ = converted("llava15_hf")
    store = Store(tmp_path)
    store.register("m", model=model)
    loader = partial(HostedModel, endpoints=[w.endpoint for w in workers])
    srv = start_server(store, loader=loader, load_options=LoadOptions(n_ctx=4096, n_threads=1))
    body = {"model": "m", "prompt": "Talk", "options": {"num_predict": 100000, "temperature": 1}}
    try:
        assert srv.ollama().generate("m", "hi", options={"num_predict": 2}).done
        w = workers[0]
        server_pid = int(
            Path(f"/proc/{w.proc.pid}/task/{w.proc.pid}/children").read_text().split()[0]
        )
        lines: list[dict[str, object]] = []
        with httpx.stream("POST", srv.url + "/api/generate", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(json.loads(line))
                if len(lines) == 3:
                    os.kill(server_pid, signal.SIGKILL)  # the worker dies mid-reply
        assert "the model's process ended" in str(lines[-1].get("error"))
        w.stop()
        down = httpx.post(srv.url + "/api/generate", json={**body, "stream": False}, timeout=60)
        assert down.status_code == 400 and w.endpoint in down.json()["error"]
        workers[0] = Worker(w.port)  # the worker is back
        assert srv.ollama().generate("m", "hi", options={"num_predict": 2}).done
    finally:
        srv.stop()
