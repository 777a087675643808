"""`mmchat rpc-worker`: lend this machine's devices to a model running on another one.

The server is ggml's own (``ggml_backend_rpc_start_server`` of the installed llama.cpp), run
in a child process (``mmchat.runtime.rpc_worker``) so that Ctrl-C stops it cleanly; this
process checks the arguments, waits until the worker answers the protocol's HELLO, prints
what it serves and stops the child on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING

import typer

from mmchat.cli.app import app
from mmchat.console import out, print_warning
from mmchat.errors import UserError
from mmchat.units import format_bytes

if TYPE_CHECKING:
    from mmchat.runtime.options import LoadOptions
    from mmchat.runtime.rpc import WorkerInfo

READY_TIMEOUT_S = 60.0


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _raise_interrupt(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@app.command("rpc-worker")
def rpc_worker(
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to listen on. Anything but loopback lets every machine that can reach "
        "it use this worker: the protocol has no authentication.",
    ),
    port: int = typer.Option(50052, "--port", "-p", min=1, max=65535, help="Port."),
    device: list[str] | None = typer.Option(
        None,
        "--device",
        "-d",
        help="ggml device to serve (repeatable; see `mmchat doctor`). Default: the local "
        "GPUs, else the CPU.",
        show_default=False,
    ),
    threads: int | None = typer.Option(
        None, "--threads", "-t", min=1, help="CPU threads (default: every CPU usable here)."
    ),
    cache: bool = typer.Option(
        False,
        "--cache",
        help="Keep large tensors the client sends in a local file cache "
        "(MMCHAT_HOME/cache/rpc): the next load of the same model sends only hashes.",
    ),
) -> None:
    """Serve this machine's devices to `mmchat run/serve --rpc HOST:PORT` elsewhere."""
    from mmchat.cli.serve import is_loopback
    from mmchat.runtime import rpc
    from mmchat.settings import load_settings

    if not rpc.rpc_available():
        raise rpc.RpcError(rpc.NO_RPC_MESSAGE)
    if ":" in host.strip("[]"):
        raise UserError("IPv6 addresses are not supported by llama.cpp's RPC; use IPv4 or a name")
    local = [d for d in rpc.local_devices() if not d.is_rpc]
    by_name = {d.name.lower(): d for d in local}
    if device:
        chosen = []
        for name in device:
            found = by_name.get(name.lower())
            if found is None:
                names = ", ".join(d.name for d in local)
                raise UserError(f"no device named {name!r} here (devices: {names})")
            chosen.append(found)
    else:
        gpus = [d for d in local if d.type in ("GPU", "iGPU")]
        chosen = gpus or [d for d in local if d.type == "CPU"][:1]
    if not chosen:
        raise UserError("ggml reports no device to serve")
    n_threads = threads or _default_threads()
    cache_dir = load_settings().cache_dir / "rpc" if cache else None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    endpoint = f"{host}:{port}"
    if not is_loopback(host):
        print_warning(
            f"the RPC worker listens on {host}: ANYONE who can reach port {port} can run code "
            "on this machine's devices and read or overwrite their memory (llama.cpp's RPC "
            "protocol has no authentication or encryption). Use it only on a private link, "
            "or keep --host 127.0.0.1 and reach it through an SSH tunnel "
            f"(ssh -N -L {port}:127.0.0.1:{port} THIS-HOST)."
        )
    cmd = [
        sys.executable,
        "-m",
        "mmchat.runtime.rpc_worker",
        endpoint,
        str(n_threads),
        str(cache_dir) if cache_dir else "-",
        *[d.name for d in chosen],
    ]
    _check_port_free(host, port)  # else the readiness probe could reach whoever holds it
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    proc = subprocess.Popen(cmd)
    try:
        info = _wait_ready(proc, host, port)
        names = ", ".join(
            f"{d.name} ({d.description}, {format_bytes(d.memory_free)} free of "
            f"{format_bytes(d.memory_total)})"
            for d in chosen
        )
        out.print(
            f"mmchat rpc-worker serving {names} on {endpoint} (RPC protocol {info.version}, "
            f"{n_threads} threads{', tensor cache ' + str(cache_dir) if cache_dir else ''}); "
            "Ctrl+C stops it",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        code = proc.wait()
        raise UserError(f"the RPC worker stopped unexpectedly (exit status {code})")
    except KeyboardInterrupt:
        _stop(proc)
        out.print("rpc-worker stopped", markup=False, highlight=False)
    finally:
        _stop(proc)
        signal.signal(signal.SIGTERM, previous)


def _check_port_free(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _wait_ready(proc: subprocess.Popen[bytes], host: str, port: int) -> WorkerInfo:
    from mmchat.runtime import rpc

    target = rpc.Endpoint("127.0.0.1" if host in ("0.0.0.0", "") else host, port)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise UserError(
                f"the RPC worker could not start on {host}:{port} (exit status "
                f"{proc.returncode}: is the port in use, or the address not one of this "
                "machine's?)"
            )
        try:
            return rpc.probe(target, timeout=2.0)
        except rpc.RpcError:
            if time.monotonic() > deadline:
                raise UserError(
                    f"the RPC worker did not answer on {host}:{port} within {READY_TIMEOUT_S:g} s"
                ) from None
            time.sleep(0.1)


# --- `--rpc` / `--tensor-split` for `mmchat run` and `mmchat serve` --------------------------

RPC_HELP = (
    "Split the model across RPC workers (`mmchat rpc-worker`): HOST:PORT,... Default: MMCHAT_RPC."
)
TENSOR_SPLIT_HELP = (
    "Share of the offloaded layers per device, RPC workers first then local GPUs, "
    "e.g. 1,1 or 3,1 (default: by free memory)."
)


def parse_tensor_split(text: str | None) -> tuple[float, ...] | None:
    if text is None or not text.strip():
        return None
    try:
        values = tuple(float(x) for x in text.replace("/", ",").split(","))
    except ValueError:
        raise UserError(f"--tensor-split takes numbers separated by commas, got {text!r}") from None
    return values


def use_workers(
    rpc_arg: str | None, tensor_split: str | None, options: LoadOptions, *, attach: bool = True
) -> list[WorkerInfo]:
    """Probe and attach the workers of ``--rpc`` (else ``MMCHAT_RPC``) before any model is
    loaded, keep vision encoders off them, and apply ``--tensor-split`` to ``options``
    (a ``LoadOptions``). Returns the workers' ``WorkerInfo``s (empty: none). ``attach``
    False: probe only (``serve`` attaches them in each model's own process)."""
    from mmchat.runtime import rpc
    from mmchat.settings import load_settings

    split = parse_tensor_split(tensor_split)
    if split is not None:
        options.tensor_split = split
    endpoints = rpc.parse_endpoints(rpc_arg if rpc_arg is not None else load_settings().rpc)
    if endpoints and not rpc.rpc_available():
        raise rpc.RpcError(rpc.NO_RPC_MESSAGE)
    if attach:
        infos = rpc.attach(endpoints) if endpoints else []
    else:
        infos = [rpc.probe(ep) for ep in endpoints]
    if infos and options.vision_device is None:
        options.vision_device = rpc.vision_device()
    if split is not None:
        # llama.cpp reads one share per GPU-type device (RPC first) and ignores the rest
        gpus = [d.name for d in rpc.local_devices() if d.type in ("GPU", "iGPU")]
        if len(split) > len(gpus):
            have = ", ".join(gpus) if gpus else "none: add --rpc workers or a GPU build"
            raise UserError(
                f"--tensor-split gives {len(split)} shares but there are {len(gpus)} devices "
                f"to share between ({have})"
            )
    return infos


def describe_workers(infos: list[WorkerInfo]) -> str:
    parts = []
    for info in infos:
        free = sum(d.memory_free for d in info.devices)
        parts.append(f"{info.endpoint} ({len(info.devices)} device(s), {format_bytes(free)} free)")
    return "RPC workers: " + ", ".join(parts)
