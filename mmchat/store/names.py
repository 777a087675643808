"""Model names: the one place that parses, normalises and validates them.

Two forms are accepted:

* ``model[:tag]`` — a name from the registry or one the user created (``llava``,
  ``llava:13b``, ``my-model:v2``). The default tag is ``latest``.
* ``hf.co/{org}/{repo}[:{quant}]`` — a GGUF repository on Hugging Face, pulled directly
  (``huggingface.co/`` is accepted as a synonym). The tag selects the quantization;
  ``latest`` means "the default quantization".

Names are case-insensitive: they are stored lower-case. The Hugging Face repository id
keeps the case the user typed, because that is what the hub is asked for.

Every name becomes a path under the store (``manifests/<model>/<tag>.json``), so anything
that could leave the store is rejected here: ``..``, ``/`` outside the hf.co form, absolute
paths, backslashes, control characters, leading dots, empty parts.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from mmchat.errors import UserError

DEFAULT_TAG = "latest"
HF_HOST = "hf.co"
_HF_PREFIXES = ("hf.co/", "huggingface.co/", "https://hf.co/", "https://huggingface.co/")

_PART = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_PART = 96
_RESERVED = {"hf.co", "huggingface.co"}


class InvalidNameError(UserError):
    """A model name that is malformed or could escape the store."""


@dataclass(frozen=True)
class ModelName:
    """A parsed, validated model name."""

    model: str
    """``llava`` or ``hf.co/org/repo`` (lower-case)."""
    tag: str
    """``latest``, ``13b``, ``q4_k_m`` ... (lower-case)."""
    hf_repo: str | None = None
    """``org/repo`` as typed (case kept), for hf.co names only."""

    @property
    def is_hf(self) -> bool:
        return self.hf_repo is not None

    @property
    def full(self) -> str:
        """``model:tag``: the canonical spelling, used as the manifest's ``name``."""
        return f"{self.model}:{self.tag}"

    @property
    def path_parts(self) -> tuple[str, ...]:
        """Path components of the manifest file under ``manifests/`` (validated)."""
        return (*self.model.split("/"), f"{self.tag}.json")

    def __str__(self) -> str:
        return self.full


def _bad(name: str, why: str) -> InvalidNameError:
    return InvalidNameError(f"Invalid model name {name!r}: {why}")


def _check_chars(raw: str) -> None:
    for ch in raw:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") or ch in "\\":
            raise _bad(raw, "it contains a control character or backslash")
        if ch.isspace():
            raise _bad(raw, "it contains whitespace")


def _check_part(raw: str, part: str, what: str, pattern: re.Pattern[str]) -> None:
    if not part:
        raise _bad(raw, f"the {what} is empty")
    if len(part) > MAX_PART:
        raise _bad(raw, f"the {what} is longer than {MAX_PART} characters")
    if ".." in part or part.startswith("."):
        raise _bad(raw, f"the {what} must not start with '.' or contain '..'")
    if not pattern.match(part):
        raise _bad(
            raw,
            f"the {what} {part!r} may only use letters, digits, '.', '_' and '-' "
            "and must start with a letter or digit",
        )


def parse_name(raw: str) -> ModelName:
    """Parse ``raw`` into a :class:`ModelName`; raise :class:`InvalidNameError` if unsafe."""
    if not isinstance(raw, str):
        raise InvalidNameError("A model name must be text")
    name = raw.strip()
    if not name:
        raise InvalidNameError("A model name must not be empty")
    _check_chars(name)
    if name.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[/\\]", name):
        raise _bad(raw, "it looks like a file path; use `mmchat create NAME --model FILE`")

    lowered = name.lower()
    prefix = next((p for p in _HF_PREFIXES if lowered.startswith(p)), None)
    if prefix is not None:
        return _parse_hf(raw, name[len(prefix) :])

    if "/" in name:
        raise _bad(raw, "'/' is only allowed in the hf.co/{org}/{repo}[:quant] form")
    base, sep, tag = name.partition(":")
    if sep and not tag:
        raise _bad(raw, "the tag after ':' is empty")
    if ":" in tag:
        raise _bad(raw, "it has more than one ':'")
    model = base.lower()
    tag = (tag or DEFAULT_TAG).lower()
    _check_part(raw, model, "model name", _PART)
    _check_part(raw, tag, "tag", _PART)
    if model in _RESERVED:
        raise _bad(raw, f"{model!r} is reserved; write hf.co/{{org}}/{{repo}}")
    return ModelName(model=model, tag=tag)


def _parse_hf(raw: str, rest: str) -> ModelName:
    repo, sep, tag = rest.partition(":")
    if sep and not tag:
        raise _bad(raw, "the quantization after ':' is empty")
    if ":" in tag:
        raise _bad(raw, "it has more than one ':'")
    parts = repo.split("/")
    if len(parts) != 2:
        raise _bad(raw, "write hf.co/{org}/{repo}[:quant] (exactly one '/' after hf.co)")
    org, name = parts
    _check_part(raw, org, "organisation", _HF_PART)
    _check_part(raw, name, "repository", _HF_PART)
    if "--" in org or "--" in name:
        raise _bad(raw, "Hugging Face repository ids cannot contain '--'")
    tag = (tag or DEFAULT_TAG).lower()
    _check_part(raw, tag, "quantization tag", _PART)
    return ModelName(
        model=f"{HF_HOST}/{org.lower()}/{name.lower()}", tag=tag, hf_repo=f"{org}/{name}"
    )


def normalize_name(raw: str) -> str:
    """``"LLaVA"`` -> ``"llava:latest"``."""
    return parse_name(raw).full
