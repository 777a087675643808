"""Human-readable sizes and durations, shared by every command that prints them."""

from __future__ import annotations


def format_bytes(n: int | float) -> str:
    """1536 -> '1.5 KiB'; binary units like `ls -h`, one decimal above bytes."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """0.0123 -> '12.3 ms', 75 -> '1m15s'."""
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s"
