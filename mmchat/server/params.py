"""Sampling parameters for a request: mmchat's defaults, then the model's stored
parameters (Ollama names, from its manifest), then the request's own."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mmchat.errors import UserError
from mmchat.server.errors import ApiError

MAX_SCHEMA_BYTES = 64 * 1024


def base_params(record: Any) -> Any:
    from mmchat.runtime import SamplingParams

    params = SamplingParams()
    stored = dict(getattr(record, "params", None) or {})
    if stored:
        try:
            params = params.with_ollama_options(_clean(stored))
        except (UserError, TypeError, ValueError) as exc:
            raise ApiError(
                500, f"the stored parameters of {record.name} are invalid: {exc}"
            ) from exc
    return params


def _clean(options: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in options.items() if v is not None}
    seed = out.get("seed")
    if isinstance(seed, int) and seed < 0:  # Ollama: -1 means a random seed
        out["seed"] = None
    return out


def with_options(params: Any, options: Mapping[str, Any]) -> Any:
    """Apply Ollama ``options`` (types already checked by the request schema)."""
    try:
        return params.with_ollama_options(_clean(options))
    except UserError as exc:
        raise ApiError(400, f"options: {exc}") from exc
    except (TypeError, ValueError) as exc:  # pragma: no cover - the schema checks types
        raise ApiError(400, f"options: {exc}") from exc


def with_format(params: Any, fmt: Any, *, field: str = "format") -> Any:
    """``"json"`` → a JSON object; a dict → that JSON schema (as a GBNF grammar)."""
    if fmt is None or fmt == "":
        return params
    if fmt == "json":
        return params.updated(format="json", grammar=None)
    if isinstance(fmt, dict):
        return params.updated(format=None, grammar=schema_grammar(fmt, field=field))
    raise ApiError(400, f'{field} must be "json" or a JSON schema object')


def schema_grammar(schema: dict[str, Any], *, field: str = "format") -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise ApiError(400, f"{field}: the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes")
    _refuse_remote_refs(schema, field)
    try:
        grammar = json_schema_to_gbnf(text)
    except RecursionError:
        raise ApiError(400, f"{field}: the JSON schema is nested too deeply") from None
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise ApiError(400, f"{field}: unsupported JSON schema ({why})") from None
    if not isinstance(grammar, str) or "root" not in grammar:
        raise ApiError(400, f"{field}: unsupported JSON schema")
    return grammar


def _refuse_remote_refs(node: Any, field: str) -> None:
    """The converter would download a ``$ref`` to an https URL: only local refs are allowed."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
                raise ApiError(
                    400, f"{field}: only local $ref (starting with '#') are allowed in the schema"
                )
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
