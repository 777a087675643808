"""From what the user typed after ``mmchat run`` (or ``/load``) to a loaded model.

MODEL is a path to a text GGUF (with ``--mmproj``) or a store name; a name that is not in
the store is pulled first, with the pull's progress bars.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from mmchat.errors import UserError

if TYPE_CHECKING:
    from mmchat.runtime.model import LoadedModel
    from mmchat.runtime.options import LoadOptions, SamplingParams


@dataclass
class ModelSource:
    """Where a model's files are and the defaults that come with it."""

    name: str
    model_path: Path
    mmproj_path: Path | None
    template: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    """Default options from the store manifest (Ollama names: ``temperature``, ``num_ctx``...)."""
    system: str | None = None
    """The model's stored system prompt (``create``'s ``system``), used unless ``--system``."""


def _looks_like_path(ref: str) -> bool:
    return ref.lower().endswith(".gguf") or ref.startswith((".", "/", "~")) or "\\" in ref


def resolve_model(
    ref: str, *, mmproj: Path | None = None, pull: bool = True, console: Console | None = None
) -> ModelSource:
    """A store name or a GGUF path → ``ModelSource``; pulls a name missing from the store."""
    ref = ref.strip()
    if not ref:
        raise UserError("no model given")
    path = Path(ref).expanduser()
    if path.is_file() or _looks_like_path(ref):
        if not path.exists():
            raise UserError(f"No such file: {ref}")
        if path.is_dir():
            raise UserError(f"{ref} is a folder; give the path of the text model's .gguf file")
        mm = _check_mmproj(mmproj)
        return ModelSource(name=path.name, model_path=path, mmproj_path=mm)

    from mmchat.hub.progress import RichPullProgress
    from mmchat.hub.pull import ensure_model

    progress = RichPullProgress(console) if console is not None else RichPullProgress()
    with progress:
        record = ensure_model(ref, progress=progress, pull=pull)
    mm = _check_mmproj(mmproj) if mmproj is not None else record.mmproj_path
    return ModelSource(
        name=record.name,
        model_path=record.model_path,
        mmproj_path=mm,
        template=record.template,
        params=dict(record.params or {}),
        system=getattr(record, "system", None),
    )


def _check_mmproj(mmproj: Path | None) -> Path | None:
    if mmproj is None:
        return None
    mm = Path(mmproj).expanduser()
    if not mm.is_file():
        raise UserError(f"No such file: {mmproj}")
    return mm


def load_options_for(source: ModelSource, options: LoadOptions) -> LoadOptions:
    """``options`` with the store's ``num_ctx`` filled in when the user gave none."""
    from dataclasses import replace

    num_ctx = source.params.get("num_ctx")
    if options.n_ctx is None and isinstance(num_ctx, int) and num_ctx > 0:
        return replace(options, n_ctx=num_ctx)
    return options


def sampling_for(source: ModelSource, base: SamplingParams | None = None) -> SamplingParams:
    """Sampling defaults: mmchat's, then the store manifest's."""
    from mmchat.runtime.options import SamplingParams

    params = base or SamplingParams()
    manifest: Mapping[str, Any] = source.params
    return params.with_ollama_options(manifest) if manifest else params


@contextlib.contextmanager
def spinner(console: Console, message: str) -> Iterator[None]:
    """A spinner on a terminal; nothing at all otherwise."""
    if console.is_terminal:
        with console.status(message, spinner="dots"):
            yield
    else:
        yield


def load(source: ModelSource, options: LoadOptions, *, console: Console | None) -> LoadedModel:
    """Load the model, with a spinner on ``console`` when it is a terminal (None: no spinner,
    the caller shows one)."""
    from mmchat.runtime import load_model

    with spinner(console, f"Loading {source.name}...") if console else contextlib.nullcontext():
        return load_model(
            source.model_path,
            source.mmproj_path,
            load_options_for(source, options),
            template=source.template,
        )
