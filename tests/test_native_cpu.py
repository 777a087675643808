"""llama.cpp's extra CPU buffer types are self-tested before use (AMX that faults on VMs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.models import converted

from mmchat.native import cpu


@pytest.fixture(autouse=True)
def _fresh_verdict() -> None:
    cpu.extra_buffers_verdict.cache_clear()


def test_override_on_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMCHAT_CPU_EXTRA_BUFFERS", "off")
    assert cpu.extra_buffers_verdict() == cpu.ExtraBuffersVerdict(
        False, "forced off by MMCHAT_CPU_EXTRA_BUFFERS"
    )
    cpu.extra_buffers_verdict.cache_clear()
    monkeypatch.setenv("MMCHAT_CPU_EXTRA_BUFFERS", "on")
    assert cpu.extra_buffers_usable() is True


def test_verdict_is_computed_once_per_machine_and_cached(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, flags = cpu._cpu_flags()
    calls: list[int] = []
    real = cpu._run_selftest

    def counting() -> cpu.ExtraBuffersVerdict:
        calls.append(1)
        return real()

    monkeypatch.setattr(cpu, "_run_selftest", counting)
    first = cpu.extra_buffers_verdict()
    if "amx_tile" not in flags:
        assert first.usable and calls == []
        return
    assert len(calls) == 1
    cached = list((isolated_home / "cache").glob("cpu-selftest-*.json"))
    assert len(cached) == 1
    assert json.loads(cached[0].read_text())["usable"] == first.usable
    cpu.extra_buffers_verdict.cache_clear()
    assert cpu.extra_buffers_verdict() == first
    assert len(calls) == 1, "the cached verdict must be reused"


def test_selftest_child_reports_or_crashes_but_parent_survives() -> None:
    verdict = cpu._run_selftest()
    assert verdict.reason
    if verdict.usable:
        assert "self-test passed" in verdict.reason
    else:
        assert "self-test" in verdict.reason


def test_quantized_model_generates_on_this_cpu() -> None:
    """The regression: q4_k_m models died with SIGILL in llama_decode on AMX-faulting VMs."""
    from mmchat.runtime import LoadOptions, SamplingParams, load_model

    text, mmproj = converted("bakllava_hf", "q4_k_m", "f16")
    model = load_model(text, mmproj, LoadOptions(n_ctx=256, n_threads=2))
    try:
        done = model.session(params=SamplingParams(temperature=0, max_tokens=6)).ask("hello")
        assert done.stats.generated_tokens > 0
    finally:
        model.close()
