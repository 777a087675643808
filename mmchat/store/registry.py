"""The registry: which short names (``llava:13b``) mean which files.

The built-in registry is a data file shipped in the package (``mmchat/data/registry.json``);
``MMCHAT_HOME/registry.json`` in the same format adds names or overrides them (a user
model replaces the built-in one's fields and adds to or replaces its tags).

A tag is one of

* ``{"alias": "7b"}`` — another tag of the same model;
* a Hugging Face source ``{"repo": "org/name", "model"?: file, "mmproj"?: file,
  "quant"?: "Q4_K_M", "revision"?: "main"}``. Without ``model`` the text GGUF is chosen
  from the repository listing at pull time (by quant, like ``hf.co/`` names); without
  ``mmproj`` the repository's projector file is chosen. ``"mmproj": null`` means none;
* a local source ``{"type": "local", "model": path, "mmproj"?: path, "sha256"?: {...}}``,
  paths relative to the folder of the registry file that names them (for models shipped
  with the package or kept next to a user registry);
* a checkpoint converted on first use ``{"type": "convert", "checkpoint": path,
  "quant"?: "q4_k_m", "vision_quant"?: "f16"}`` (the built-in ``demo``), path likewise
  relative to the registry file.

Model- and tag-level keys (tag wins): ``description``, ``family``, ``template_hint``,
``template``, ``license``, ``params``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmchat.errors import CorruptFileError, UserError
from mmchat.store.names import DEFAULT_TAG, ModelName, parse_name

BUILTIN_PATH = Path(__file__).resolve().parent.parent / "data" / "registry.json"
_INHERITED = ("description", "family", "template_hint", "template", "license", "params")
_MAX_ALIAS_DEPTH = 8


@dataclass(frozen=True)
class Source:
    """Where a model's files come from."""

    type: str  # "hf", "local" or "convert"
    repo: str | None = None
    revision: str | None = None
    model: str | None = None
    mmproj: str | None = None
    mmproj_auto: bool = True
    """For hf sources without an explicit ``mmproj``: pick the repo's projector file."""
    quant: str | None = None
    base_dir: Path | None = None
    sha256: dict[str, str] = field(default_factory=dict)
    checkpoint: str | None = None
    """For "convert" sources: the Hugging Face checkpoint folder to convert."""
    vision_quant: str | None = None

    @property
    def checkpoint_path(self) -> Path | None:
        if self.checkpoint is None:
            return None
        return ((self.base_dir or Path.cwd()) / self.checkpoint).resolve()

    def describe(self) -> str:
        if self.type == "hf":
            rev = f"@{self.revision}" if self.revision else ""
            return f"hf.co/{self.repo}{rev}"
        if self.type == "convert":
            return f"{self.checkpoint_path}, converted locally (no download)"
        return f"local files in {self.base_dir}"


@dataclass(frozen=True)
class RegistryEntry:
    name: ModelName
    source: Source
    description: str | None = None
    family: str | None = None
    template_hint: str | None = None
    template: str | None = None
    license: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


def hf_entry(name: ModelName) -> RegistryEntry:
    """The entry an ``hf.co/{org}/{repo}[:quant]`` name stands for."""
    assert name.hf_repo is not None
    quant = None if name.tag == DEFAULT_TAG else name.tag
    return RegistryEntry(name=name, source=Source(type="hf", repo=name.hf_repo, quant=quant))


class Registry:
    """Built-in and user registries merged; look names up with :meth:`lookup`."""

    def __init__(self, models: dict[str, dict[str, Any]]) -> None:
        self.models = models

    def lookup(self, name: ModelName | str) -> RegistryEntry | None:
        mname = parse_name(name) if isinstance(name, str) else name
        if mname.is_hf:
            return hf_entry(mname)
        model = self.models.get(mname.model)
        if model is None:
            return None
        tags: dict[str, Any] = model.get("tags", {})
        tag = mname.tag
        seen: list[str] = []
        while True:
            spec = tags.get(tag)
            if spec is None:
                return None
            if "alias" not in spec:
                break
            seen.append(tag)
            tag = str(spec["alias"]).lower()
            if len(seen) > _MAX_ALIAS_DEPTH or tag in seen:
                raise UserError(f"Registry alias loop for {mname.model}: {' -> '.join(seen)}")
        merged = {k: model[k] for k in _INHERITED if k in model}
        merged.update({k: spec[k] for k in _INHERITED if k in spec})
        return RegistryEntry(
            name=mname,
            source=_source(mname, spec, spec.get("_base_dir")),
            description=merged.get("description"),
            family=merged.get("family"),
            template_hint=merged.get("template_hint"),
            template=merged.get("template"),
            license=merged.get("license"),
            params=dict(merged.get("params") or {}),
        )

    def names(self) -> list[str]:
        """Every ``model:tag`` the registry knows, aliases included."""
        return sorted(f"{m}:{t}" for m, spec in self.models.items() for t in spec.get("tags", {}))


def _source(name: ModelName, spec: dict[str, Any], base_dir: Any) -> Source:
    kind = spec.get("type", "hf" if "repo" in spec else "local")
    if kind == "hf":
        if not isinstance(spec.get("repo"), str):
            raise UserError(f"Registry entry {name.full} has no Hugging Face 'repo'")
        return Source(
            type="hf",
            repo=spec["repo"],
            revision=spec.get("revision"),
            model=spec.get("model"),
            mmproj=spec.get("mmproj"),
            mmproj_auto="mmproj" not in spec,
            quant=spec.get("quant"),
        )
    if kind == "local":
        if not isinstance(spec.get("model"), str):
            raise UserError(f"Registry entry {name.full} (local) has no 'model' path")
        return Source(
            type="local",
            model=spec["model"],
            mmproj=spec.get("mmproj"),
            mmproj_auto=False,
            base_dir=Path(base_dir) if base_dir else None,
            sha256=dict(spec.get("sha256") or {}),
        )
    if kind == "convert":
        if not isinstance(spec.get("checkpoint"), str):
            raise UserError(f"Registry entry {name.full} (convert) has no 'checkpoint' path")
        return Source(
            type="convert",
            checkpoint=spec["checkpoint"],
            quant=spec.get("quant"),
            vision_quant=spec.get("vision_quant"),
            mmproj_auto=False,
            base_dir=Path(base_dir) if base_dir else None,
        )
    raise UserError(f"Registry entry {name.full} has unknown source type {kind!r}")


def _read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"Registry file {path} is unreadable: {exc}") from exc
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise CorruptFileError(f"Registry file {path} has no 'models' object")
    out: dict[str, dict[str, Any]] = {}
    for raw_name, spec in models.items():
        mname = parse_name(str(raw_name))
        if mname.is_hf or mname.tag != DEFAULT_TAG or ":" in str(raw_name):
            raise CorruptFileError(f"Registry file {path}: {raw_name!r} is not a plain model name")
        if not isinstance(spec, dict) or not isinstance(spec.get("tags", {}), dict):
            raise CorruptFileError(f"Registry file {path}: entry {raw_name!r} is malformed")
        tags = {parse_name(f"x:{t}").tag: v for t, v in spec.get("tags", {}).items()}
        for tag, tspec in tags.items():
            if not isinstance(tspec, dict):
                raise CorruptFileError(f"Registry file {path}: {raw_name}:{tag} is malformed")
            tspec["_base_dir"] = str(path.parent)  # local paths are relative to this file
        out[mname.model] = {**spec, "tags": tags}
    return out


def load_registry(home: Path | None = None, *, builtin: Path | None = None) -> Registry:
    """The built-in registry, extended by ``home/registry.json`` when it exists."""
    if home is None:
        from mmchat.settings import load_settings

        home = load_settings().home
    models = _read(builtin or BUILTIN_PATH)
    user = Path(home) / "registry.json"
    if user.is_file():
        for name, spec in _read(user).items():
            if name in models:
                base = models[name]
                merged_tags = {**base.get("tags", {}), **spec.get("tags", {})}
                models[name] = {**base, **spec, "tags": merged_tags}
            else:
                models[name] = spec
    return Registry(models)
