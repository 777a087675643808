"""Default generation parameters and chat templates stored with a model (``create``).

Parameter names follow Ollama's Modelfile ``PARAMETER`` names, since the HTTP API
speaks Ollama's ``options`` too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmchat.errors import NotFoundError, UserError

PARAM_TYPES: dict[str, type] = {
    "num_ctx": int,
    "num_predict": int,
    "num_batch": int,
    "num_gpu": int,
    "num_thread": int,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "typical_p": float,
    "repeat_penalty": float,
    "repeat_last_n": int,
    "presence_penalty": float,
    "frequency_penalty": float,
    "seed": int,
    "stop": list,
}


def _coerce(key: str, raw: str) -> Any:
    kind = PARAM_TYPES[key]
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if kind is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        return [raw]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"Parameter {key} must be an integer, got {raw!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"Parameter {key} must be a number, got {raw!r}")
        return float(value)
    return value


def parse_params(items: Iterable[str]) -> dict[str, Any]:
    """``["temperature=0.2", "stop=</s>", "stop=USER:"]`` -> a checked dict."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise UserError(f"Parameters are written key=value, got {item!r}")
        if key not in PARAM_TYPES:
            raise UserError(f"Unknown parameter {key!r}; known: {', '.join(sorted(PARAM_TYPES))}")
        value = _coerce(key, raw.strip())
        if key == "stop" and "stop" in params:
            params["stop"] = [*params["stop"], *value]
        else:
            params[key] = value
    return params


def load_template(path: Path) -> str:
    """Read a Jinja chat template file and check that it parses."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise NotFoundError(f"No such template file: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"Cannot read template {p}: {exc}") from exc
    if not text.strip():
        raise UserError(f"Template file {p} is empty")
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"Template {p} line {exc.lineno}: {exc.message}") from exc
    return text
