"""``mmchat pull``: from a name to verified blobs and a manifest.

1. :meth:`Puller.plan` resolves the name (registry entry or ``hf.co/`` form), asks the hub
   for the repository listing with sizes and LFS sha256 at one commit, and picks the
   files. Nothing is downloaded; ``--dry-run`` stops after printing the plan.
2. :meth:`Puller.pull` downloads each file into the blob store (:mod:`mmchat.hub.download`),
   validates the pair (roles, projector width), and writes the manifest last.

:func:`ensure_model` is what ``run``/``serve`` call: the local store is looked at first,
so a model that is present needs no network at all (offline use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mmchat.errors import NotFoundError, UserError
from mmchat.hub.download import Downloader, RemoteFile
from mmchat.hub.progress import PullProgress
from mmchat.hub.select import select_files
from mmchat.store.inspect import check_pair, summarize_model, summarize_projector
from mmchat.store.names import ModelName, parse_name
from mmchat.store.registry import Registry, RegistryEntry, load_registry
from mmchat.store.store import ModelRecord, PartRef, Store, check_digest, hash_file, open_store


@dataclass
class PlannedFile:
    role: str  # "model" or "mmproj"
    filename: str
    size: int | None
    sha256: str | None = None
    remote: RemoteFile | None = None
    local_path: Path | None = None
    present: bool = False


@dataclass
class PullPlan:
    name: ModelName
    entry: RegistryEntry
    files: list[PlannedFile]
    revision: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    @property
    def download_size(self) -> int:
        return sum(f.size or 0 for f in self.files if not f.present)

    @property
    def source_label(self) -> str:
        src = self.entry.source
        if src.type == "hf":
            rev = f" @ {self.revision[:12]}" if self.revision else ""
            return f"hf.co/{src.repo}{rev}"
        return src.describe()


def hf_endpoint() -> str:
    """``HF_ENDPOINT`` as huggingface_hub sees it (read when called, not at import)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def resolve_url(endpoint: str, repo: str, revision: str, filename: str) -> str:
    """The hub's download URL layout: ``{endpoint}/{repo}/resolve/{revision}/{file}``."""
    return f"{endpoint}/{repo}/resolve/{quote(revision, safe='')}/{quote(filename)}"


def explain_hf_error(exc: Exception, repo: str, filename: str | None = None) -> UserError:
    """Turn huggingface_hub/httpx errors into one clear line naming the repo or file."""
    from huggingface_hub import errors as hf

    if isinstance(exc, hf.GatedRepoError):
        return UserError(
            f"Hugging Face repository {repo} is gated: accept its terms on the website and "
            "set HF_TOKEN (or run `hf auth login`)"
        )
    if isinstance(exc, hf.RepositoryNotFoundError):
        return NotFoundError(
            f"Hugging Face repository {repo} not found (if it is private, set HF_TOKEN)"
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return NotFoundError(f"Revision not found in Hugging Face repository {repo}")
    if isinstance(exc, hf.EntryNotFoundError | hf.RemoteEntryNotFoundError):
        what = f"File {filename!r}" if filename else "A file"
        return NotFoundError(f"{what} not found in Hugging Face repository {repo}")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return UserError(f"HF_HUB_OFFLINE is set: cannot reach the hub for {repo}")
    if isinstance(exc, hf.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return UserError(f"Hugging Face hub error {status} for {repo}: {str(exc).splitlines()[0]}")
    import httpx2

    if isinstance(exc, httpx2.HTTPError):
        return UserError(f"Cannot reach the Hugging Face hub ({hf_endpoint()}) for {repo}: {exc}")
    raise exc


class Puller:
    """Plans and performs pulls into one store."""

    def __init__(
        self,
        store: Store | None = None,
        registry: Registry | None = None,
        *,
        endpoint: str | None = None,
        token: str | bool | None = None,
        progress: PullProgress | None = None,
        hf_cache: Path | None = None,
        retries: int = 5,
        backoff: float = 1.0,
    ) -> None:
        self.store = store or open_store()
        self.registry = registry or load_registry(self.store.home)
        self.endpoint = (endpoint or hf_endpoint()).rstrip("/")
        self.token = token
        self.progress = progress or PullProgress()
        if hf_cache is None:
            from huggingface_hub import constants

            hf_cache = Path(constants.HF_HUB_CACHE)
        self.hf_cache = hf_cache
        self.retries = retries
        self.backoff = backoff

    # ------------------------------------------------------------------ plan
    def entry(self, name: str | ModelName) -> RegistryEntry:
        mname = parse_name(name) if isinstance(name, str) else name
        entry = self.registry.lookup(mname)
        if entry is None:
            local = self.store.get(mname)
            if local is not None:
                kind = local.manifest.get("source", {}).get("type") or "local"
                raise UserError(
                    f"{mname.full} is a local model ({kind}); there is nothing to pull for it"
                )
            known = sorted({n.split(":")[0] for n in self.registry.names()})
            raise NotFoundError(
                f"Unknown model {mname.full!r}: not in the registry ({', '.join(known)}). "
                "Pull a GGUF repository directly with hf.co/{org}/{repo}[:quant]"
            )
        return entry

    def plan(self, name: str | ModelName) -> PullPlan:
        entry = self.entry(name)
        if entry.source.type == "local":
            return self._plan_local(entry)
        if entry.source.type == "convert":
            return self._plan_convert(entry)
        return self._plan_hf(entry)

    def _plan_convert(self, entry: RegistryEntry) -> PullPlan:
        path = entry.source.checkpoint_path
        if path is None or not (path / "config.json").is_file():
            raise NotFoundError(f"{entry.name.full}: checkpoint folder {path} does not exist")
        return PullPlan(entry.name, entry, [])

    def _plan_hf(self, entry: RegistryEntry) -> PullPlan:
        from huggingface_hub import HfApi

        src = entry.source
        assert src.repo is not None
        if hf_offline():
            raise UserError(
                f"HF_HUB_OFFLINE is set and {entry.name.full} is not in the store: "
                "cannot download it"
            )
        api = HfApi(endpoint=self.endpoint, token=self.token)
        try:
            info = api.model_info(src.repo, revision=src.revision, files_metadata=True)
        except Exception as exc:
            raise explain_hf_error(exc, src.repo) from exc
        siblings = {s.rfilename: s for s in (info.siblings or [])}
        sel = select_files(
            siblings,
            repo=src.repo,
            quant=src.quant,
            model=src.model,
            mmproj=src.mmproj,
            mmproj_auto=src.mmproj_auto,
        )
        revision = info.sha or src.revision or "main"
        files: list[PlannedFile] = []
        for role, filename in (("model", sel.model), ("mmproj", sel.mmproj)):
            if filename is None:
                continue
            sib = siblings[filename]
            sha = sib.lfs.sha256 if sib.lfs is not None else None
            size = sib.lfs.size if sib.lfs is not None else sib.size
            remote = RemoteFile(
                repo=src.repo,
                revision=revision,
                filename=filename,
                url=resolve_url(self.endpoint, src.repo, revision, filename),
                size=size,
                sha256=sha,
                git_oid=sib.blob_id,
            )
            present = sha is not None and self.store.has_blob(sha, size)
            files.append(PlannedFile(role, filename, size, sha, remote=remote, present=present))
        return PullPlan(entry.name, entry, files, revision=revision, notes=list(sel.notes))

    def _plan_local(self, entry: RegistryEntry) -> PullPlan:
        src = entry.source
        base = src.base_dir or Path.cwd()
        files: list[PlannedFile] = []
        for role, rel in (("model", src.model), ("mmproj", src.mmproj)):
            if rel is None:
                continue
            path = (base / rel).resolve()
            if not path.is_file():
                raise NotFoundError(f"{entry.name.full}: local file {path} does not exist")
            sha = src.sha256.get(role)
            size = path.stat().st_size
            present = sha is not None and self.store.has_blob(sha, size)
            files.append(PlannedFile(role, path.name, size, sha, local_path=path, present=present))
        return PullPlan(entry.name, entry, files)

    # ------------------------------------------------------------------ pull
    def pull(self, target: str | ModelName | PullPlan) -> ModelRecord:
        plan = target if isinstance(target, PullPlan) else self.plan(target)
        if plan.entry.source.type == "convert":
            return self._pull_convert(plan)
        headers: dict[str, str] = {}
        if plan.entry.source.type == "hf":
            from huggingface_hub.utils import build_hf_headers

            headers = build_hf_headers(token=self.token)
        downloader = Downloader(
            self.store,
            headers=headers,
            progress=self.progress,
            retries=self.retries,
            backoff=self.backoff,
            hf_cache=self.hf_cache,
        )
        fetched: dict[str, tuple[str, int]] = {}
        for f in plan.files:
            if f.local_path is not None:
                fetched[f.role] = self.store.ingest(f.local_path, expected_digest=f.sha256)
                continue
            assert f.remote is not None
            try:
                fetched[f.role] = downloader.fetch(f.remote)
            except UserError:
                raise
            except Exception as exc:
                raise explain_hf_error(exc, f.remote.repo, f.filename) from exc
        return self._commit(plan, fetched)

    def _pull_convert(self, plan: PullPlan) -> ModelRecord:
        """Convert the entry's checkpoint with the normal converter, straight into blobs."""
        import tempfile

        from mmchat.converters import convert

        src = plan.entry.source
        checkpoint = src.checkpoint_path
        assert checkpoint is not None
        self.store.root.mkdir(parents=True, exist_ok=True)
        # inside the store, so the results are renamed (not copied) into blobs
        with tempfile.TemporaryDirectory(prefix=".convert-", dir=self.store.root) as tmp:
            result = convert(
                checkpoint,
                outdir=Path(tmp),
                name=plan.name.model,
                quant=src.quant or "q4_k_m",
                vision_quant=src.vision_quant or "f16",
            )
            fetched: dict[str, tuple[str, int]] = {}
            files: list[PlannedFile] = []
            for role, path in (("model", result.model_path), ("mmproj", result.mmproj_path)):
                if path is None:
                    continue
                fetched[role] = self.store.ingest(path, move=True)
                files.append(PlannedFile(role, path.name, fetched[role][1], fetched[role][0]))
        plan.files = files
        return self._commit(plan, fetched)

    def _commit(self, plan: PullPlan, fetched: dict[str, tuple[str, int]]) -> ModelRecord:
        from mmchat.gguf_meta import read_gguf

        new_digests = {d for d, _ in fetched.values()}
        old = self.store.get(plan.name)
        try:
            infos = {
                role: read_gguf(self.store.blob_path(digest), role=role)
                for role, (digest, _) in fetched.items()
            }
            check_pair(infos["model"], infos.get("mmproj"))
        except UserError:
            self.store.delete_orphans(new_digests)
            raise
        parts: dict[str, PartRef] = {}
        for f in plan.files:
            digest, size = fetched[f.role]
            info = infos[f.role]
            summary = summarize_model(info) if f.role == "model" else summarize_projector(info)
            parts[f.role] = PartRef(f.role, digest, size, f.filename, summary)
        entry = plan.entry
        source: dict[str, Any]
        if entry.source.type == "hf":
            source = {
                "type": "hf",
                "repo": entry.source.repo,
                "revision": plan.revision,
                "endpoint": self.endpoint,
                "files": {f.role: f.filename for f in plan.files},
            }
        elif entry.source.type == "convert":
            source = {
                "type": "convert",
                "path": str(entry.source.checkpoint_path),
                "quant": entry.source.quant or "q4_k_m",
                "vision_quant": entry.source.vision_quant or "f16",
                "files": {f.role: f.filename for f in plan.files},
            }
        else:
            source = {"type": "local", "files": {f.role: str(f.local_path) for f in plan.files}}
        rec = self.store.commit(
            plan.name,
            parts,
            template=entry.template,
            template_hint=entry.template_hint,
            params=entry.params,
            license=entry.license,
            family=entry.family,
            source=source,
        )
        if old is not None:
            stale = {check_digest(p["digest"]) for p in old.parts.values()} - new_digests
            if stale:
                self.store.delete_orphans(stale)
        return rec


def ensure_model(
    name: str,
    *,
    store: Store | None = None,
    progress: PullProgress | None = None,
    pull: bool = True,
) -> ModelRecord:
    """The model named ``name``: from the store when present (no network), else pulled."""
    store = store or open_store()
    mname = parse_name(name)
    if store.get(mname) is not None:
        return store.resolve(mname)
    if not pull:
        return store.resolve(mname)  # raises NotFoundError
    return Puller(store, progress=progress).pull(mname)


def verify_model(store: Store, name: str) -> list[str]:
    """Re-hash every blob of a model; return the problems found (empty when intact)."""
    rec = store.resolve(name)
    problems = []
    for role, part in rec.parts.items():
        path = store.blob_path(part["digest"])
        digest, _ = hash_file(path)
        if digest != check_digest(part["digest"]):
            problems.append(f"{role}: {path} does not match its digest")
    return problems
