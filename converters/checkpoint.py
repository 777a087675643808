"""Reading Hugging Face checkpoints one tensor at a time.

* safetensors (single file or sharded with ``model.safetensors.index.json``): the header is
  parsed here (it is JSON behind an 8-byte length) and each tensor is read on demand with
  ``readinto`` into a fresh buffer, so memory holds one tensor at a time and nothing of the
  file stays resident after it was converted. Offsets are validated against the file size
  up front, so a truncated file is reported before any output is written.
* PyTorch ``.bin`` files only through ``torch.load(weights_only=True)`` (no arbitrary
  unpickling, never code from the checkpoint) and only when torch is installed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmchat.errors import CorruptFileError, UserError

# safetensors dtype name -> (numpy dtype used to read the raw bytes, bytes per element)
_ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),  # reinterpreted as the top half of a float32
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U8": ("u1", 1),
    "BOOL": ("u1", 1),
}

MAX_HEADER_BYTES = 100 * 1024 * 1024


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """uint16 bit patterns of bfloat16 values -> float32 (exact)."""
    out = np.empty(raw.shape, dtype=np.uint32)
    np.left_shift(raw, 16, out=out, dtype=np.uint32)
    return out.view(np.float32)


@dataclass
class TensorRef:
    """One tensor in a checkpoint; :meth:`load` reads it (as float32 for float dtypes)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: F32, F16, BF16, ...
    nbytes: int
    _reader: Any

    def load(self) -> np.ndarray:
        arr: np.ndarray = self._reader.read(self)
        return arr


class _SafetensorsFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.refs: dict[str, TensorRef] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        self._parse()

    def _bad(self, why: str) -> CorruptFileError:
        return CorruptFileError(f"{self.path} is not a valid safetensors file: {why}")

    def _parse(self) -> None:
        try:
            size = self.path.stat().st_size
            with self.path.open("rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise self._bad("the file is empty or truncated")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise self._bad("the header length is impossible (truncated or damaged)")
                raw = fh.read(n)
        except OSError as exc:
            raise CorruptFileError(f"Cannot read {self.path}: {exc.strerror or exc}") from exc
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._bad(f"the header is not JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise self._bad("the header is not a JSON object")
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = str(info["dtype"])
                shape = tuple(int(x) for x in info["shape"])
                start, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise self._bad(f"tensor {name!r} has a damaged entry") from exc
            if dtype not in _ST_DTYPES:
                raise self._bad(f"tensor {name!r} has unsupported dtype {dtype}")
            count = int(np.prod(shape)) if shape else 1
            nbytes = count * _ST_DTYPES[dtype][1]
            if end - start != nbytes or start < 0:
                raise self._bad(f"tensor {name!r}: its byte range does not match its shape")
            if base + end > size:
                raise CorruptFileError(
                    f"{self.path} is truncated: tensor {name!r} ends at byte {base + end} "
                    f"but the file has {size} bytes"
                )
            self._offsets[name] = (base + start, nbytes)
            self.refs[name] = TensorRef(name, shape, dtype, nbytes, self)

    def read(self, ref: TensorRef) -> np.ndarray:
        offset, nbytes = self._offsets[ref.name]
        np_dtype, _ = _ST_DTYPES[ref.dtype]
        buf = np.empty(nbytes, dtype=np.uint8)
        try:
            with self.path.open("rb", buffering=0) as fh:
                fh.seek(offset)
                view = buf.data
                got = 0
                while got < nbytes:
                    k = fh.readinto(view[got:])
                    if not k:
                        break
                    got += k
        except OSError as exc:
            raise CorruptFileError(f"Cannot read {self.path}: {exc.strerror or exc}") from exc
        if got != nbytes:
            raise CorruptFileError(f"{self.path} is truncated while reading {ref.name!r}")
        arr = buf.view(np_dtype).reshape(ref.shape)
        if ref.dtype == "BF16":
            return bf16_to_f32(arr)
        if ref.dtype in ("F16", "F64"):
            return arr.astype(np.float32)
        return arr


class _TorchFile:
    """A ``.bin`` checkpoint read with ``torch.load(weights_only=True, mmap=True)``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            import torch
        except ImportError:
            raise UserError(
                f"{path.name} is a PyTorch checkpoint; reading it needs torch "
                "(pip install torch). mmchat loads it only with torch.load(weights_only=True). "
                "A safetensors version of the checkpoint needs no torch."
            ) from None
        self._torch = torch
        try:
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                # mmap needs the zip format; old-style pickles load without it
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, zipfile errors
            raise CorruptFileError(
                f"{path} cannot be loaded safely as weights (weights_only=True): {exc}"
            ) from exc
        if not isinstance(sd, dict):
            raise CorruptFileError(f"{path} does not hold a state dict")
        for key in ("state_dict", "model"):  # Lightning / LAVIS and MiniGPT-4 wrappers
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
        self._sd = sd
        names = {
            torch.float32: "F32",
            torch.float16: "F16",
            torch.bfloat16: "BF16",
            torch.float64: "F64",
            torch.int64: "I64",
            torch.int32: "I32",
            torch.bool: "BOOL",
        }
        self.refs: dict[str, TensorRef] = {}
        for name, t in sd.items():
            if not isinstance(t, torch.Tensor):
                continue
            dt = names.get(t.dtype)
            if dt is None:
                raise CorruptFileError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
            self.refs[name] = TensorRef(
                name, tuple(int(x) for x in t.shape), dt, t.numel() * t.element_size(), self
            )

    def read(self, ref: TensorRef) -> np.ndarray:
        t = self._sd[ref.name]
        if t.dtype in (self._torch.float16, self._torch.bfloat16, self._torch.float64):
            t = t.to(self._torch.float32)
        return np.ascontiguousarray(t.detach().numpy())  # a saved parameter may need grad


class Checkpoint:
    """All tensors of a checkpoint folder (one or many files), by name."""

    def __init__(self, refs: dict[str, TensorRef], files: list[Path]) -> None:
        self.refs = refs
        self.files = files

    def __contains__(self, name: object) -> bool:
        return name in self.refs

    def __getitem__(self, name: str) -> TensorRef:
        return self.refs[name]

    def names(self) -> list[str]:
        return list(self.refs)

    def __iter__(self) -> Iterator[TensorRef]:
        return iter(self.refs.values())

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.refs.values())


def _index_files(folder: Path, index_name: str) -> list[Path]:
    index = folder / index_name
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptFileError(f"{index} is not a valid checkpoint index: {exc}") from exc
    files = [folder / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CorruptFileError(
            f"{index.name} lists shard(s) that are missing from {folder}: {', '.join(missing)}"
        )
    return files


def find_weight_files(folder: Path, *, prefix: str = "model") -> list[Path]:
    """The weight files of a checkpoint folder, safetensors preferred over .bin."""
    st_index = folder / f"{prefix}.safetensors.index.json"
    if st_index.is_file():
        return _index_files(folder, st_index.name)
    single = folder / f"{prefix}.safetensors"
    if single.is_file():
        return [single]
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return st
    bin_index = folder / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        return _index_files(folder, bin_index.name)
    single_bin = folder / "pytorch_model.bin"
    if single_bin.is_file():
        return [single_bin]
    # only weight shards: training_args.bin and friends are not state dicts
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise UserError(f"No weights (*.safetensors or pytorch_model*.bin) found in {folder}")


def open_checkpoint(folder: Path) -> Checkpoint:
    files = find_weight_files(folder)
    refs: dict[str, TensorRef] = {}
    for f in files:
        reader: _SafetensorsFile | _TorchFile
        reader = _SafetensorsFile(f) if f.suffix == ".safetensors" else _TorchFile(f)
        for name, ref in reader.refs.items():
            if name in refs:
                raise CorruptFileError(f"Tensor {name!r} appears in more than one file of {folder}")
            refs[name] = ref
    if not refs:
        raise CorruptFileError(f"The checkpoint in {folder} holds no tensors")
    return Checkpoint(refs, files)
