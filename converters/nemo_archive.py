"""Reading NeMo 1.x ``.nemo`` archives safely: config, tokenizer and (merged) weights.

A ``.nemo`` file is a tar (plain or gzip) holding ``model_config.yaml`` and the weights as
``model_weights.ckpt`` (one rank), ``mp_rank_XX/model_weights.ckpt`` (tensor parallel) or
``tp_rank_XX_pp_rank_YYY/model_weights.ckpt`` (tensor + pipeline parallel) or a Megatron-core
distributed checkpoint ``model_weights/`` (read by ``nemo_dist.py``), plus artifacts
such as the SentencePiece ``tokenizer.model`` the config names as ``nemo:<file>``.

Safety: members are never extracted by ``tarfile``'s own logic. Every member name is checked
(no absolute path, no ``..``, regular files only: no links, devices or FIFOs), and only the
members needed are copied out, by name, into a private temporary folder that is removed when
the archive object is garbage collected (or at exit). The YAML is read with
``yaml.safe_load``; the pickled weights only with ``torch.load(weights_only=True)``.

Tensor-parallel shards are merged on demand, one tensor at a time: column-parallel weights
(QKV, fc1, embeddings, output head) along rows, row-parallel weights (attention output, fc2)
along columns; a swiglu fc1 shard holds [gate_r; up_r], so gates and ups are gathered
separately. Pipeline stages number their layers from 0; they are renumbered in stage order.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tarfile
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from mmchat.errors import CorruptFileError, UserError

from .checkpoint import Checkpoint, TensorRef
from .nemo_dist import DIST_DIR, DistCheckpoint

CONFIG_NAME = "model_config.yaml"
WEIGHTS_NAME = "model_weights.ckpt"
_RANK_DIR = re.compile(r"^(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))$")
_LAYER = re.compile(r"^(.*?\.layers\.)(\d+)(\..*)$")

# Megatron's parallel linears: which dimension a tensor-parallel shard splits.
_COLUMN = (
    "linear_qkv.weight",
    "linear_qkv.bias",
    "query_key_value.weight",
    "query_key_value.bias",
    "linear_fc1.weight",
    "linear_fc1.bias",
    "dense_h_to_4h.weight",
    "dense_h_to_4h.bias",
    "dense_h_to_4h_2.weight",
    "dense_h_to_4h_2.bias",
    "word_embeddings.weight",
    "output_layer.weight",
)
_ROW = ("linear_proj.weight", "linear_fc2.weight", "dense.weight", "dense_4h_to_h.weight")


def _split_dim(name: str) -> int | None:
    """0 (rows), 1 (columns) or None (replicated) for a tensor-parallel shard."""
    if ".adapter_layer." in name:  # the NeVA projector is a plain torch module
        return None
    if name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    return None


def safe_member_name(name: str) -> str:
    """The member's normalised relative path, or CorruptFileError for an unsafe one."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise CorruptFileError(f"the archive member {name!r} has an absolute path; refused")
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise CorruptFileError(f"the archive member {name!r} points outside the archive; refused")
    return "/".join(parts)


def _load_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError("Reading a .nemo needs PyYAML (pip install pyyaml)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CorruptFileError(f"{where} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise CorruptFileError(f"{where} does not hold a YAML mapping")
    return data


@dataclass
class _Shard:
    tp: int
    pp: int
    path: Path  # extracted model_weights.ckpt


class _Scratch:
    """The private temp folder (and the open tar) of an archive, released when nothing
    refers to it any more: the archive and every tensor read from it hold it, so the
    folder outlives the conversion's lazy tensor loads and goes right after."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="mmchat-nemo-"))
        self.open_files: list[tarfile.TarFile] = []
        self._final = weakref.finalize(self, _release, self.path, self.open_files)

    def release(self) -> None:
        self._final()


class _MergedReader:
    """Reads one logical tensor from its tensor-parallel shards."""

    def __init__(self, scratch: _Scratch) -> None:
        self.scratch = scratch  # keeps the extracted shards alive
        self.parts: dict[str, list[TensorRef]] = {}
        self.dims: dict[str, int | None] = {}
        self.swiglu: set[str] = set()

    def read(self, ref: TensorRef) -> np.ndarray:
        parts = [p.load() for p in self.parts[ref.name]]
        dim = self.dims[ref.name]
        if dim is None or len(parts) == 1:
            out = parts[0]
        elif ref.name in self.swiglu:  # each shard is [gate_r; up_r]
            halves = [np.split(p, 2, axis=0) for p in parts]
            out = np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
        else:
            out = np.concatenate(parts, axis=dim)
        if tuple(out.shape) != tuple(ref.shape):
            raise CorruptFileError(f"{ref.name}: merged shape {out.shape} != {ref.shape}")
        return out


class NemoArchive:
    """An opened ``.nemo``: ``config`` (the YAML), ``weights`` (a merged Checkpoint) and
    ``extract(name)`` for artifacts. Temporary files go when the object does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._scratch = _Scratch()
        self._tmp = self._scratch.path
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._scratch.release()

    # --- reading the tar ----------------------------------------------------------------

    def _open(self) -> None:
        self._members: dict[str, tarfile.TarInfo] = {}
        self._files: dict[str, Path] = {}  # an unpacked .nemo folder: member -> file
        if self.path.is_dir():
            self._scan_folder()
        else:
            self._scan_tar()
        if CONFIG_NAME not in self._members and CONFIG_NAME not in self._files:
            raise CorruptFileError(
                f"{self.path} has no {CONFIG_NAME}: it is not a NeMo 1.x model archive"
            )
        raw = self._read_member(CONFIG_NAME)
        cfg = _load_yaml(raw.decode("utf-8", errors="replace"), f"{self.path}:{CONFIG_NAME}")
        if "mm_cfg" not in cfg and isinstance(cfg.get("model"), dict):  # a training config
            cfg = cfg["model"]
        self.config: dict[str, Any] = cfg
        self.weights = self._open_weights()

    def _scan_folder(self) -> None:
        """An unpacked .nemo: regular files inside the folder (links must stay inside)."""
        root = self.path.resolve()
        for f in sorted(self.path.rglob("*")):
            real = f.resolve()
            if not real.is_relative_to(root):
                raise CorruptFileError(f"{f} points outside {self.path}; refused")
            if real.is_file():
                self._files[f.relative_to(self.path).as_posix()] = real

    def _scan_tar(self) -> None:
        try:
            tar = tarfile.open(self.path, mode="r:*")  # noqa: SIM115 (closed by _release)
            self._scratch.open_files.append(tar)
            self._tar = tar
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise CorruptFileError(
                f"{self.path} is not a readable .nemo archive (a tar file): {exc}"
            ) from exc
        for m in members:
            name = safe_member_name(m.name)
            if m.isdir():
                continue
            if not m.isfile():
                raise CorruptFileError(
                    f"the archive member {m.name!r} is a link or special file; refused"
                )
            if name:
                self._members[name] = m

    def names(self) -> list[str]:
        return [*self._members, *self._files]

    def _read_member(self, name: str) -> bytes:
        if name in self._files:
            try:
                return self._files[name].read_bytes()
            except OSError as exc:
                raise CorruptFileError(f"Cannot read {self._files[name]}: {exc}") from exc
        fh = self._tar.extractfile(self._members[name])
        if fh is None:  # pragma: no cover - isfile() was checked
            raise CorruptFileError(f"cannot read {name} from {self.path}")
        try:
            return fh.read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise CorruptFileError(f"{self.path} is truncated or damaged ({name}): {exc}") from exc

    def extract(self, name: str, dest_name: str | None = None, *, copy: bool = True) -> Path:
        """Copy one member into the private temp folder (by name, checked) and return it.
        In an unpacked folder, ``copy=False`` returns the file itself."""
        name = safe_member_name(name)
        if name in self._files:
            if not copy:
                return self._files[name]
            out = self._tmp / (dest_name or name.replace("/", "__"))
            try:
                shutil.copyfile(self._files[name], out)
            except OSError as exc:
                raise UserError(f"Cannot copy {self._files[name]}: {exc}") from exc
            return out
        if name not in self._members:
            raise CorruptFileError(f"{self.path} has no member {name!r}")
        m = self._members[name]
        out = self._tmp / (dest_name or name.replace("/", "__"))
        fh = self._tar.extractfile(m)
        if fh is None:  # pragma: no cover
            raise CorruptFileError(f"cannot read {name} from {self.path}")
        try:
            with out.open("wb") as dst:
                shutil.copyfileobj(fh, dst, 1 << 22)
        except (tarfile.TarError, EOFError) as exc:
            raise CorruptFileError(f"{self.path} is truncated or damaged ({name}): {exc}") from exc
        except OSError as exc:
            raise UserError(f"Cannot unpack {name} from {self.path}: {exc}") from exc
        if out.stat().st_size != m.size:
            raise CorruptFileError(
                f"{self.path} is truncated: {name} has {out.stat().st_size} of {m.size} bytes"
            )
        return out

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes of a member from ``offset`` (chunks of a distributed checkpoint)."""
        with self._lock:
            try:
                if name in self._files:
                    with self._files[name].open("rb") as fh:
                        fh.seek(offset)
                        data = fh.read(length)
                else:
                    member = self._tar.extractfile(self._members[name])
                    if member is None:  # pragma: no cover - isfile() was checked
                        raise CorruptFileError(f"cannot read {name} from {self.path}")
                    member.seek(offset)
                    data = member.read(length)
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise CorruptFileError(f"{self.path}: cannot read {name}: {exc}") from exc
        if len(data) != length:
            raise CorruptFileError(f"{self.path} is truncated: {name} ends early")
        return data

    def find(self, basename: str) -> str | None:
        """A member whose file name is ``basename`` (NeMo prefixes artifacts with a hash)."""
        names = self.names()
        if basename in names:
            return basename
        hits = [n for n in names if PurePosixPath(n).name == basename]
        if not hits:
            hits = [n for n in names if PurePosixPath(n).name.endswith("_" + basename)]
        return hits[0] if len(hits) == 1 else None

    # --- weights --------------------------------------------------------------------------

    def _shard_members(self) -> list[tuple[int, int, str]]:
        found: list[tuple[int, int, str]] = []
        for name in self.names():
            parts = name.split("/")
            if parts[-1] != WEIGHTS_NAME:
                continue
            if len(parts) == 1:
                found.append((0, 0, name))
            elif len(parts) == 2 and (m := _RANK_DIR.match(parts[0])):
                tp = int(m.group(1) if m.group(1) is not None else m.group(2))
                pp = int(m.group(3) or 0)
                found.append((tp, pp, name))
        return sorted(found, key=lambda t: (t[1], t[0]))

    def _open_weights(self) -> Checkpoint:
        from .checkpoint import _TorchFile

        shards = self._shard_members()
        if not shards:
            if any(n.startswith(DIST_DIR) for n in self.names()):
                # Megatron-core's torch_dist checkpoint: global tensors, no shards to merge
                dist = DistCheckpoint(self.names(), self._read_member, self.read_range)
                self.tp = 1  # tensors are global whatever the training layout was
                self.pp = int(self.config.get("pipeline_model_parallel_size") or 1)
                return Checkpoint(dist.refs(), [])
            raise CorruptFileError(
                f"{self.path} has no {WEIGHTS_NAME} (nor mp_rank_XX/ or tp_rank_XX_pp_rank_YYY/ "
                "shards): it holds no weights"
            )
        tps = sorted({t for t, _, _ in shards})
        pps = sorted({p for _, p, _ in shards})
        if tps != list(range(len(tps))) or pps != list(range(len(pps))):
            raise CorruptFileError(f"{self.path}: incomplete tensor/pipeline-parallel shards")
        if len(shards) != len(tps) * len(pps):
            raise CorruptFileError(f"{self.path}: some tensor/pipeline-parallel shards are missing")
        cfg_tp = int(self.config.get("tensor_model_parallel_size") or 1)
        if cfg_tp != len(tps):
            raise CorruptFileError(
                f"{self.path}: the config says tensor_model_parallel_size {cfg_tp} but the "
                f"archive has {len(tps)} shard(s)"
            )
        files: dict[tuple[int, int], _TorchFile] = {}
        for tp, pp, name in shards:
            path = self.extract(name, f"tp{tp}_pp{pp}.ckpt", copy=False)
            with _bytesio_allowed():
                files[(tp, pp)] = _TorchFile(path)
        merged = _MergedReader(self._scratch)
        refs: dict[str, TensorRef] = {}
        layer_offset = 0
        swiglu = str(self.config.get("activation", "gelu")) in ("swiglu", "fast-swiglu")
        for pp in range(len(pps)):
            rank0 = files[(0, pp)]
            n_layers_here = 0
            for name in rank0.refs:
                if name.endswith("_extra_state"):
                    continue
                full = name
                if len(pps) > 1 and (m := _LAYER.match(name)):
                    n_layers_here = max(n_layers_here, int(m.group(2)) + 1)
                    full = f"{m.group(1)}{int(m.group(2)) + layer_offset}{m.group(3)}"
                parts = []
                for tp in range(len(tps)):
                    r = files[(tp, pp)].refs.get(name)
                    if r is None:
                        raise CorruptFileError(f"{self.path}: shard tp{tp} lacks tensor {name!r}")
                    parts.append(r)
                dim = _split_dim(name) if len(tps) > 1 else None
                shape = list(parts[0].shape)
                if dim is not None and dim < len(shape):
                    if any(len(p.shape) != len(shape) for p in parts):
                        raise CorruptFileError(f"{self.path}: shards of {name!r} differ in rank")
                    shape[dim] = sum(p.shape[dim] for p in parts)
                elif any(tuple(p.shape) != tuple(shape) for p in parts):
                    raise CorruptFileError(f"{self.path}: shards of replicated {name!r} differ")
                else:
                    dim = None
                if full in refs:
                    raise CorruptFileError(f"{self.path}: tensor {full!r} appears twice")
                merged.parts[full] = parts
                merged.dims[full] = dim
                # a fused swiglu fc1 ([gate; up] per shard): Megatron-core's linear_fc1, or
                # the older dense_h_to_4h of 'fast-swiglu' (plain 'swiglu' has a separate
                # dense_h_to_4h_2 for the up half)
                second = name.replace("dense_h_to_4h.", "dense_h_to_4h_2.")
                fused = "linear_fc1." in name or (
                    "dense_h_to_4h." in name and second not in rank0.refs
                )
                if swiglu and dim == 0 and fused:
                    merged.swiglu.add(full)
                nbytes = sum(p.nbytes for p in parts)
                refs[full] = TensorRef(full, tuple(shape), parts[0].dtype, nbytes, merged)
            layer_offset += n_layers_here
        if not refs:
            raise CorruptFileError(f"{self.path}: the weights hold no tensors")
        self.tp, self.pp = len(tps), len(pps)
        return Checkpoint(refs, [f.path for f in files.values()])


def _release(tmp: Path, open_files: list[tarfile.TarFile]) -> None:
    for f in open_files:
        f.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _bytesio_allowed() -> contextlib.AbstractContextManager[Any]:
    """Transformer Engine layers save their ``_extra_state`` (FP8 metadata) as io.BytesIO;
    let ``torch.load(weights_only=True)`` rebuild it and ``bytes`` (its pickled argument),
    both inert: a BytesIO is made from bytes and runs nothing. Everything else stays
    refused."""
    try:
        import torch

        return torch.serialization.safe_globals([io.BytesIO, bytes])
    except (ImportError, AttributeError):  # no torch: _TorchFile says what to install
        return contextlib.nullcontext()


def is_nemo2_folder(path: Path) -> bool:
    return path.is_dir() and (path / "context").is_dir() and (path / "weights").is_dir()


NEMO2_MESSAGE = (
    "{path} is a NeMo 2.0 checkpoint folder (context/ + weights/, a distributed checkpoint); "
    "mmchat converts NeMo 1.x .nemo files. Export it to Hugging Face with NeMo "
    "(nemo.collections.llm.export_ckpt(path, target='hf')) and convert that folder instead"
)
