"""`mmchat doctor`: what mmchat runs on, and whether it is usable.

Gathers facts only (a :class:`DoctorReport`); rendering is the CLI's job.
"""

from __future__ import annotations

import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmchat import __version__
from mmchat.settings import load_settings


@dataclass
class DoctorReport:
    mmchat_version: str
    python: str
    platform: str
    llama_cpp_python: str | None
    ggml_version: str | None
    ggml_commit: str | None
    gpu_offload: bool
    native_library: str | None
    native_loaded: bool
    native_error: str | None
    devices: list[dict[str, Any]] = field(default_factory=list)
    cpu_extra_buffers: str = ""
    store_path: str = ""
    store_free_bytes: int | None = None
    problems: list[str] = field(default_factory=list)
    rpc_available: bool | None = None
    """llama.cpp was built with its RPC backend (None: llama-cpp-python is missing)."""
    rpc_workers: list[dict[str, Any]] = field(default_factory=list)
    """The configured RPC workers as probed: endpoint, version, devices, or error."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def _free_bytes(path: Path) -> int | None:
    """Free space on the filesystem that holds (or will hold) ``path``."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _rpc_report(configured: str | None, problems: list[str]) -> tuple[bool, list[dict[str, Any]]]:
    """Whether RPC is built in, and each configured worker probed (in Python: a dead worker
    is a line in the report, never a crash)."""
    from mmchat.runtime import rpc

    available = rpc.rpc_available()
    workers: list[dict[str, Any]] = []
    try:
        endpoints = rpc.parse_endpoints(configured)
    except rpc.RpcError as exc:
        problems.append(str(exc))
        return available, workers
    if endpoints and not available:
        problems.append(rpc.NO_RPC_MESSAGE)
    for ep in endpoints:
        try:
            workers.append(rpc.probe(ep).to_dict())
        except rpc.RpcError as exc:
            problems.append(str(exc))
            workers.append({"endpoint": str(ep), "error": str(exc)})
    return available, workers


def collect(rpc: str | None = None) -> DoctorReport:
    """``rpc``: workers to probe (``HOST:PORT,…``); default ``MMCHAT_RPC``."""
    settings = load_settings()
    problems: list[str] = []

    llama_version: str | None = None
    gpu_offload = False
    try:
        import llama_cpp

        llama_version = getattr(llama_cpp, "__version__", "unknown")
        gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception as exc:  # a broken llama-cpp-python install is what doctor is for
        problems.append(f"llama-cpp-python cannot be imported: {exc}")

    from mmchat.native import NativeUnavailableError, find_library, load_library

    lib_path = find_library()
    native_loaded = False
    native_error: str | None = None
    ggml_version = ggml_commit = None
    devices: list[dict[str, Any]] = []
    if llama_version is not None:
        try:
            lib = load_library()
            native_loaded = True
            lib_path = lib.path
            ggml_version, ggml_commit = lib.ggml_version, lib.ggml_commit
            devices = [asdict(d) | {"is_gpu": d.is_gpu} for d in lib.devices()]
        except NativeUnavailableError as exc:
            native_error = str(exc)
            problems.append(f"native vision library unusable: {exc}")
    else:
        native_error = "not loaded (llama-cpp-python is missing)"
    if native_loaded and not devices:
        problems.append("the ggml backend registry reports no compute device")
    rpc_available: bool | None = None
    rpc_workers: list[dict[str, Any]] = []
    if llama_version is not None:
        rpc_available, rpc_workers = _rpc_report(rpc if rpc is not None else settings.rpc, problems)
    cpu_extra = ""
    if native_loaded:
        from mmchat.native.cpu import extra_buffers_verdict

        verdict = extra_buffers_verdict()
        cpu_extra = ("enabled: " if verdict.usable else "disabled: ") + verdict.reason

    return DoctorReport(
        mmchat_version=__version__,
        python=f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        platform=f"{platform.system()} {platform.release()} {platform.machine()}",
        llama_cpp_python=llama_version,
        ggml_version=ggml_version,
        ggml_commit=ggml_commit,
        gpu_offload=gpu_offload,
        native_library=str(lib_path) if lib_path else None,
        native_loaded=native_loaded,
        native_error=native_error,
        devices=devices,
        cpu_extra_buffers=cpu_extra,
        store_path=str(settings.home),
        store_free_bytes=_free_bytes(settings.home),
        problems=problems,
        rpc_available=rpc_available,
        rpc_workers=rpc_workers,
    )
