"""Where a checkpoint comes from: a local folder, or a Hugging Face repo id downloaded with
huggingface_hub (which honours HF_ENDPOINT, HF_TOKEN, HF_HOME and HF_HUB_OFFLINE)."""

from __future__ import annotations

import re
from pathlib import Path

from mmchat.errors import NotFoundError, UserError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# Small files every conversion reads; the weights are chosen by what the repo has.
_META = [
    "*.json",
    "tokenizer.model",
    "*.jinja",
]


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and ".." not in text


def _download(repo_id: str, *, what: str) -> Path:
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise UserError("Downloading needs huggingface_hub (pip install huggingface_hub)") from exc
    from huggingface_hub import errors as hf_errors

    try:
        files = HfApi().list_repo_files(repo_id)
    except hf_errors.RepositoryNotFoundError as exc:
        raise NotFoundError(
            f"{what} {repo_id!r} is neither a local folder nor a Hugging Face repository "
            "you can access (for a private or gated repo set HF_TOKEN)"
        ) from exc
    except hf_errors.OfflineModeIsEnabled:
        files = []
    except Exception as exc:
        raise UserError(f"Cannot reach the Hugging Face hub for {repo_id!r}: {exc}") from exc
    patterns = list(_META)
    if any(f.endswith(".safetensors") for f in files) or not files:
        patterns.append("*.safetensors")
    else:
        patterns += ["pytorch_model*.bin"]
    try:
        path = snapshot_download(repo_id, allow_patterns=patterns)
    except hf_errors.RepositoryNotFoundError as exc:
        raise NotFoundError(f"No Hugging Face repository {repo_id!r}") from exc
    except Exception as exc:
        raise UserError(f"Downloading {repo_id!r} failed: {exc}") from exc
    return Path(path)


def resolve_source(source: str | Path) -> tuple[Path, str | None]:
    """(local folder, repo id or None)."""
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{p} is a file; convert takes a checkpoint folder or a repo id")
        return p.resolve(), None
    text = str(source)
    if is_repo_id(text) and not text.startswith((".", "/", "~")):
        return _download(text, what="Source"), text
    raise NotFoundError(f"No such folder: {p} (and it is not a Hugging Face repo id)")


def download_vision_tower(repo_id: str) -> Path:
    if not is_repo_id(repo_id):
        raise UserError(
            f"The checkpoint's vision tower {repo_id!r} is not a local folder or a repo id; "
            "give the tower with --vision-tower PATH"
        )
    try:
        return _download(repo_id, what="Vision tower")
    except UserError as exc:
        raise UserError(
            f"The vision tower {repo_id!r} (mm_vision_tower) is missing: {exc}. "
            "Give a local copy with --vision-tower PATH"
        ) from exc
