"""`mmchat doctor` and `mmchat --version`, through the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mmchat


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "mmchat", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"mmchat {mmchat.__version__}"


def test_doctor_json_reports_cpu_device_and_native_library(isolated_home: Path) -> None:
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert report["mmchat_version"] == mmchat.__version__
    assert report["llama_cpp_python"] == "0.3.36"
    assert report["native_loaded"] is True
    assert Path(report["native_library"]).is_file()
    assert report["ggml_version"] and report["ggml_commit"]
    cpus = [d for d in report["devices"] if d["type"] == "CPU"]
    assert cpus, report["devices"]
    assert cpus[0]["backend"] == "CPU"
    assert report["store_path"] == str(isolated_home)
    assert report["store_free_bytes"] > 0


def test_doctor_table_lists_devices_and_library() -> None:
    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "mmchat doctor" in text
    assert "llama-cpp-python" in text and "0.3.36" in text
    assert "loaded from" in text
    assert "device 0:" in text and "CPU" in text
    assert "usable" in text


def test_doctor_with_native_library_missing_fails_with_reason(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "libmmvision.so"
    proc = run_cli("doctor", env={"MMCHAT_NATIVE_LIB": str(missing)})
    assert proc.returncode != 0
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err_lines) == 1, proc.stderr
    assert "native vision library unusable" in err_lines[0]
    assert str(missing) in err_lines[0]
    assert "not usable" in proc.stdout


def test_doctor_json_with_unloadable_library(tmp_path: Path) -> None:
    bogus = tmp_path / "libmmvision.so"
    bogus.write_bytes(b"this is not a shared library")
    proc = run_cli("doctor", "--json", env={"MMCHAT_NATIVE_LIB": str(bogus)})
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    assert report["native_loaded"] is False
    assert "cannot open" in report["native_error"]
    assert report["problems"]


@pytest.mark.parametrize("bad", ["--bogus-flag"])
def test_unknown_option_is_a_usage_error(bad: str) -> None:
    proc = run_cli("doctor", bad)
    assert proc.returncode == 2
    assert "No such option" in proc.stderr


def test_user_error_is_one_red_line_and_exit_2() -> None:
    proc = run_cli("doctor", env={"MMCHAT_MAX_IMAGE_PIXELS": "lots"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "Error: MMCHAT_MAX_IMAGE_PIXELS must be an integer, got 'lots'"
    assert "Traceback" not in proc.stderr


def test_debug_flag_shows_the_traceback() -> None:
    proc = run_cli("--debug", "doctor", env={"MMCHAT_MAX_IMAGE_PIXELS": "lots"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "UserError" in proc.stderr
