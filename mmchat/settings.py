"""Every setting mmchat reads from the environment, in one place.

No other module reads ``os.environ`` for mmchat's own settings. ``HF_*`` variables are
left to huggingface_hub, which honours them itself (``HF_ENDPOINT``, ``HF_TOKEN``,
``HF_HOME``, ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11435
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
DEFAULT_KEEP_ALIVE_S = 300.0


@dataclass(frozen=True)
class Settings:
    """A snapshot of the environment-derived settings."""

    home: Path
    """``MMCHAT_HOME``: the model store, history, caches. Default ``~/.mmchat``."""
    host: str
    """``MMCHAT_HOST``: ``host`` or ``host:port`` for ``mmchat serve``."""
    port: int
    api_key: str | None
    """``MMCHAT_API_KEY``: bearer token required by ``mmchat serve`` when set."""
    native_lib: Path | None
    """``MMCHAT_NATIVE_LIB``: use this vision library instead of the installed one."""
    max_image_pixels: int
    """``MMCHAT_MAX_IMAGE_PIXELS``: decompression-bomb guard for images."""
    keep_alive_s: float
    """``MMCHAT_KEEP_ALIVE``: seconds a served model stays loaded when idle."""
    debug: bool
    """``MMCHAT_DEBUG``: show tracebacks for user errors."""
    num_parallel: int | None = None
    """``MMCHAT_NUM_PARALLEL``: replies a served model produces at once (unset: chosen per
    model from its size, the context and the free memory)."""
    max_audio_bytes: int = 64 * 1024 * 1024
    """``MMCHAT_MAX_AUDIO_BYTES``: the largest audio file accepted (default 64 MiB)."""
    cpu_extra_buffers: str = "auto"
    """``MMCHAT_CPU_EXTRA_BUFFERS``: ``auto`` (self-test), ``on`` or ``off`` — llama.cpp's
    extra CPU buffer types (AMX, repacked weights); see mmchat/native/cpu.py."""
    rpc: str | None = None
    """``MMCHAT_RPC``: ``HOST:PORT,…`` RPC workers (``mmchat rpc-worker``) that ``mmchat run``
    and ``mmchat serve`` split models across, and ``mmchat doctor`` probes."""

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def history_file(self) -> Path:
        return self.home / "history"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"


def _split_host(value: str) -> tuple[str, int]:
    value = value.strip()
    if value.startswith("["):  # [::1]:port
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":")
        return host, int(port) if port else DEFAULT_PORT
    if value.count(":") == 1:
        host, port = value.split(":")
        return host or DEFAULT_HOST, int(port)
    return value or DEFAULT_HOST, DEFAULT_PORT


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        from mmchat.errors import UserError

        raise UserError(f"{name} must be an integer, got {raw!r}") from None


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        from mmchat.errors import UserError

        raise UserError(f"{name} must be a number of seconds, got {raw!r}") from None


def _choice(name: str, allowed: tuple[str, ...], default: str) -> str:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in allowed:
        from mmchat.errors import UserError

        raise UserError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
    return raw


def load_settings() -> Settings:
    """Read the environment now (tests change it, so nothing is cached)."""
    env = os.environ
    home = Path(env.get("MMCHAT_HOME") or Path.home() / ".mmchat").expanduser()
    host, port = _split_host(env.get("MMCHAT_HOST", DEFAULT_HOST))
    native = env.get("MMCHAT_NATIVE_LIB")
    return Settings(
        home=home,
        host=host,
        port=port,
        api_key=env.get("MMCHAT_API_KEY") or None,
        native_lib=Path(native).expanduser() if native else None,
        max_image_pixels=_int("MMCHAT_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS),
        keep_alive_s=_float("MMCHAT_KEEP_ALIVE", DEFAULT_KEEP_ALIVE_S),
        debug=env.get("MMCHAT_DEBUG", "") not in ("", "0", "false", "no"),
        max_audio_bytes=_int("MMCHAT_MAX_AUDIO_BYTES", 64 * 1024 * 1024),
        num_parallel=_int("MMCHAT_NUM_PARALLEL", 0) or None,
        cpu_extra_buffers=_choice("MMCHAT_CPU_EXTRA_BUFFERS", ("auto", "on", "off"), "auto"),
        rpc=env.get("MMCHAT_RPC", "").strip() or None,
    )
