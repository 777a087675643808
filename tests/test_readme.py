"""The README's command reference is generated from the CLI and must match it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _reference_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "cli_reference", ROOT / "docs" / "cli_reference.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_reference_matches_cli() -> None:
    ref = _reference_module()
    readme = (ROOT / "README.md").read_text()
    assert ref.current_block(readme) == ref.render(), (
        "README.md command reference is stale: run python docs/cli_reference.py --write"
    )


def test_every_command_is_documented() -> None:
    import typer.main

    from mmchat.cli import app

    group = typer.main.get_command(app)
    readme = (ROOT / "README.md").read_text()
    for name in group.commands:  # type: ignore[attr-defined]
        assert f"### `mmchat {name}`" in readme, name


def test_quick_start_has_exactly_three_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:sh|bash|console)?\n(.*?)```", section, re.S)
    assert block, "Quick start needs a shell block"
    commands = [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(commands) == 3, commands
