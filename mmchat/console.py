"""The rich consoles every command prints through (stdout for results, stderr for errors)."""

from __future__ import annotations

from rich.console import Console

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def print_error(message: str) -> None:
    """One red line on stderr, no markup interpretation of the message."""
    err.print(f"Error: {message}", style="bold red", markup=False, soft_wrap=True)


def print_warning(message: str) -> None:
    err.print(f"Warning: {message}", style="yellow", markup=False, soft_wrap=True)
