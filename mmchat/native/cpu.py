"""Whether llama.cpp's extra CPU buffer types (AMX, repacked weights) work on this machine.

Some virtual machines advertise AMX in CPUID but fault on its tile instructions: llama.cpp
then dies with SIGILL in ``llama_decode`` on every quantized model. Before loading a model
on such a CPU, mmchat runs libmmvision's self-test (one small quantized matrix product per
extra buffer type, checked against plain CPU buffers) in a child process, once per machine
and ggml version, and caches the verdict under ``MMCHAT_HOME/cache``. When the self-test
crashes or computes wrong results, models are loaded without extra buffer types
(``llama_model_params.use_extra_bufts = false``): slower prompt processing, but correct.
``MMCHAT_CPU_EXTRA_BUFFERS=on|off`` overrides the verdict.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mmchat.settings import load_settings

SELFTEST_TIMEOUT_S = 120


@dataclass(frozen=True)
class ExtraBuffersVerdict:
    usable: bool
    reason: str


def _cpu_flags() -> tuple[str, set[str]]:
    """CPU model name and feature flags from /proc/cpuinfo (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    model = ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def _cache_file(model: str, flags: set[str], ggml_version: str) -> Path:
    key = hashlib.sha256(
        json.dumps([model, sorted(flags), ggml_version, sys.platform]).encode()
    ).hexdigest()[:16]
    return load_settings().cache_dir / f"cpu-selftest-{key}.json"


def _run_selftest() -> ExtraBuffersVerdict:
    proc = subprocess.run(
        [sys.executable, "-c", "from mmchat.native.cpu import selftest_child; selftest_child()"],
        capture_output=True,
        text=True,
        timeout=SELFTEST_TIMEOUT_S,
    )
    report = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode == 0:
        return ExtraBuffersVerdict(True, f"self-test passed ({report})")
    if proc.returncode < 0:
        return ExtraBuffersVerdict(
            False, f"self-test crashed with signal {-proc.returncode} (AMX advertised but faults)"
        )
    return ExtraBuffersVerdict(False, f"self-test failed ({report or proc.stderr.strip()})")


def selftest_child() -> None:
    """Entry point of the child process: run the self-test, print its report, exit 0/1."""
    from mmchat.native.library import load_library

    lib = load_library().lib
    lib.mmv_cpu_extra_buffers_selftest.restype = ctypes.c_int
    lib.mmv_cpu_extra_buffers_selftest.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    report = ctypes.create_string_buffer(1024)
    status = lib.mmv_cpu_extra_buffers_selftest(report, len(report))
    print(report.value.decode(errors="replace"), flush=True)
    sys.exit(0 if status == 0 else 1)


@functools.lru_cache(maxsize=1)
def extra_buffers_verdict() -> ExtraBuffersVerdict:
    """The (cached) verdict for this machine; cheap after the first call."""
    override = load_settings().cpu_extra_buffers
    if override == "on":
        return ExtraBuffersVerdict(True, "forced on by MMCHAT_CPU_EXTRA_BUFFERS")
    if override == "off":
        return ExtraBuffersVerdict(False, "forced off by MMCHAT_CPU_EXTRA_BUFFERS")
    model, flags = _cpu_flags()
    if "amx_tile" not in flags:
        return ExtraBuffersVerdict(True, "no AMX on this CPU; nothing to check")
    from mmchat.native.library import NativeUnavailableError, load_library

    try:
        ggml_version = load_library().ggml_version
    except NativeUnavailableError as exc:
        return ExtraBuffersVerdict(False, f"AMX advertised and the self-test is unavailable: {exc}")
    cache = _cache_file(model, flags, ggml_version)
    try:
        return ExtraBuffersVerdict(**json.loads(cache.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    try:
        verdict = _run_selftest()
    except subprocess.TimeoutExpired:
        verdict = ExtraBuffersVerdict(False, "self-test timed out")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(verdict)))
        os.replace(tmp, cache)
    except OSError:
        pass  # an unwritable cache only costs a re-run next time
    return verdict


def extra_buffers_usable() -> bool:
    return extra_buffers_verdict().usable
