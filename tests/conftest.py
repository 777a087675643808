"""Suite-wide fixtures. Every test gets its own MMCHAT_HOME and HF_HOME (never the real home)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("home")
    home = root / "mmchat"
    monkeypatch.setenv("MMCHAT_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for var in ("MMCHAT_HOST", "MMCHAT_API_KEY", "MMCHAT_DEBUG", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    yield home
