"""``mmchat ps`` and ``mmchat stop``: thin clients of a running ``mmchat serve``.

Like Ollama's: ``ps`` lists the models the server holds loaded (``GET /api/ps``), ``stop``
unloads one (``POST /api/generate`` with an empty prompt and ``keep_alive`` 0, which never
loads a model that is not loaded). The server is found at ``MMCHAT_HOST`` (the address
``mmchat serve`` listens on by default); ``MMCHAT_API_KEY`` is sent when set.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any

import typer

from mmchat.cli.app import app
from mmchat.console import out
from mmchat.errors import NotFoundError, UserError
from mmchat.units import format_bytes

TIMEOUT_S = 30.0


def server_url() -> str:
    """The base URL of the local server (``MMCHAT_HOST``; a wildcard bind means loopback)."""
    from mmchat.settings import load_settings

    settings = load_settings()
    host = settings.host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{settings.port}"


def call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One JSON request to the server; its ``{"error"}`` answers become ``UserError``s."""
    from mmchat.settings import load_settings

    base = server_url()
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    key = load_settings().api_key
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        message = _error_text(exc.read()) or f"HTTP {exc.code}"
        if exc.code == 404:
            raise NotFoundError(message) from None
        raise UserError(f"the server at {base} answered: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"could not reach mmchat serve at {base} ({reason}); is it running? "
            "Start it with `mmchat serve` (or set MMCHAT_HOST)"
        ) from None
    return json.loads(raw) if raw else None


def _error_text(raw: bytes) -> str:
    try:
        err = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return raw.decode("utf-8", errors="replace")[:200]
    if isinstance(err, dict):
        err = err.get("message")
    return str(err or "")


def _processor(size: int, vram: int) -> str:
    if not size or vram <= 0:
        return "100% CPU"
    if vram >= size:
        return "100% GPU"
    gpu = round(100 * vram / size)
    return f"{100 - gpu}%/{gpu}% CPU/GPU"


def _until(stamp: str | None, now: float) -> str:
    if not stamp:
        return "-"
    try:
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return stamp
    left = when - now
    if left > 365 * 86400:
        return "Forever"
    if left <= 0:
        return "Stopping..."
    for unit, secs in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if left >= secs:
            n = int(left // secs)
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    return "Less than a second"


@app.command()
def ps(
    as_json: bool = typer.Option(False, "--json", help="Print the server's JSON."),
) -> None:
    """List the models a running `mmchat serve` holds loaded."""
    from rich.table import Table

    models = (call("GET", "/api/ps") or {}).get("models", [])
    if as_json:
        typer.echo(json.dumps(models, indent=2))
        return
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for col in ("NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"):
        table.add_column(col, no_wrap=True, justify="right" if col == "SIZE" else "left")
    now = time.time()
    for m in models:
        size = int(m.get("size") or 0)
        table.add_row(
            str(m.get("name") or m.get("model")),
            str(m.get("digest") or "")[:12],
            format_bytes(size),
            _processor(size, int(m.get("size_vram") or 0)),
            str(m.get("context_length") or "-"),
            _until(m.get("expires_at"), now),
        )
    out.print(table)


@app.command()
def stop(
    name: str = typer.Argument(..., help="A model loaded by the server (see `mmchat ps`)."),
) -> None:
    """Unload a model from a running `mmchat serve`."""
    from mmchat.store import parse_name

    full = parse_name(name).full
    loaded = {m.get("name") for m in (call("GET", "/api/ps") or {}).get("models", [])}
    if full not in loaded:
        try:
            call("POST", "/api/show", {"model": name})
        except NotFoundError:
            raise UserError(f"couldn't find model {name!r} to stop") from None
        out.print(f"{full} is not running", markup=False, highlight=False)
        return
    try:
        call("POST", "/api/generate", {"model": name, "keep_alive": 0, "stream": False})
    except NotFoundError:
        raise UserError(f"couldn't find model {name!r} to stop") from None
