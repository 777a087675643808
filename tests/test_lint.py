"""The code stays ruff-clean, ruff-formatted and mypy-clean (part of the suite, so CI runs it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY_DIRS = ["mmchat", "converters", "tests", "benchmarks", "docs", "demo"]


def _tool(name: str) -> list[str]:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return [str(exe)]
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (it is part of the `test` extra)")
    return [found]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _existing(dirs: list[str]) -> list[str]:
    return [d for d in dirs if (ROOT / d).exists()]


def test_ruff_check() -> None:
    proc = _run([*_tool("ruff"), "check", *_existing(PY_DIRS)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format() -> None:
    proc = _run([*_tool("ruff"), "format", "--check", *_existing(PY_DIRS)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy() -> None:
    proc = _run([*_tool("mypy"), *_existing(["mmchat", "converters"])])
    assert proc.returncode == 0, proc.stdout + proc.stderr
