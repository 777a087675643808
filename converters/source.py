"""Where a checkpoint comes from: a local folder, or a Hugging Face repo id downloaded with
huggingface_hub (which honours HF_ENDPOINT, HF_TOKEN, HF_HOME and HF_HUB_OFFLINE)."""

from __future__ import annotations

import fnmatch
import hashlib
import re
from pathlib import Path

from mmchat.errors import CorruptFileError, NotFoundError, UserError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# Small files every conversion reads; the weights are chosen by what the repo has.
_META = [
    "*.json",
    "tokenizer.model",
    "*.jinja",
]


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and ".." not in text


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _verify(folder: Path, expected: dict[str, str], repo_id: str) -> None:
    """huggingface_hub does not check what it downloaded: compare every LFS file's sha256
    and remove a damaged one from the cache so the next attempt downloads it again."""
    for name, sha in expected.items():
        path = folder / name
        if not path.is_file():
            continue
        if _sha256(path) != sha:
            real = path.resolve()
            path.unlink(missing_ok=True)
            real.unlink(missing_ok=True)
            raise CorruptFileError(
                f"{name} from {repo_id!r} is damaged (sha256 mismatch); it was removed from "
                "the download cache, run the command again"
            )


def _download(repo_id: str, *, what: str) -> Path:
    try:
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise UserError("Downloading needs huggingface_hub (pip install huggingface_hub)") from exc

    names: list[str] = []
    lfs: dict[str, str] = {}
    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
        for sib in info.siblings or []:
            names.append(sib.rfilename)
            if sib.lfs is not None and getattr(sib.lfs, "sha256", None):
                lfs[sib.rfilename] = str(sib.lfs.sha256)
    except hf_errors.RepositoryNotFoundError as exc:
        raise NotFoundError(
            f"{what} {repo_id!r} is neither a local folder nor a Hugging Face repository "
            "you can access (for a private or gated repo set HF_TOKEN)"
        ) from exc
    except hf_errors.OfflineModeIsEnabled:
        pass
    except Exception as exc:
        raise UserError(f"Cannot reach the Hugging Face hub for {repo_id!r}: {exc}") from exc
    patterns = list(_META)
    if any(n.endswith(".safetensors") for n in names) or not names:
        patterns.append("*.safetensors")
    else:
        patterns.append("pytorch_model*.bin")
    try:
        if names:  # one file at a time through the resolve/ endpoint, like snapshot_download
            wanted = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
            if "config.json" not in wanted:
                raise NotFoundError(f"{what} {repo_id!r} has no config.json (not a checkpoint)")
            revision = getattr(info, "sha", None)
            got = [hf_hub_download(repo_id, n, revision=revision) for n in wanted]
            path = Path(got[wanted.index("config.json")]).parent
        else:  # offline: whatever the cache holds
            path = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except UserError:
        raise
    except hf_errors.RepositoryNotFoundError as exc:
        raise NotFoundError(f"No Hugging Face repository {repo_id!r}") from exc
    except Exception as exc:
        raise UserError(f"Downloading {repo_id!r} failed: {str(exc).rstrip('.')}") from exc
    _verify(path, lfs, repo_id)
    return path


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
            f"The vision tower {repo_id!r} (mm_vision_tower) is missing: "
            f"{str(exc).rstrip('.')}. Give a local copy with --vision-tower PATH"
        ) from exc
