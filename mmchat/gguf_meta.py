"""Reading and validating GGUF headers with gguf-py, with clear errors for bad files.

One place that turns "some file" into facts: its architecture, metadata, tensors and
whether it is complete. Used by the store (``show``, ``create``), the vision engine (to
validate an mmproj before C sees it) and the runtime.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmchat.errors import CorruptFileError, NotFoundError

GGUF_MAGIC = b"GGUF"
# Arrays longer than this are summarised by their length (a 32k-token vocabulary is not
# needed to show a model); ask for them explicitly with GGUFInfo.array(key).
MAX_INLINE_ARRAY = 64


@dataclass
class TensorSummary:
    name: str
    type: str
    shape: tuple[int, ...]
    n_bytes: int


@dataclass
class GGUFInfo:
    """What a GGUF file holds, read without loading tensor data."""

    path: Path
    size: int
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorSummary] = field(default_factory=list)
    _reader: Any = field(default=None, repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def is_mmproj(self) -> bool:
        return self.architecture == "clip"

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        """``{architecture}.{suffix}``, e.g. ``arch_key("embedding_length")``."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    def array(self, key: str) -> list[Any]:
        """The full value of an array key, however long."""
        fld = self._reader.fields.get(key) if self._reader is not None else None
        if fld is None:
            raise KeyError(key)
        return list(fld.contents())

    def tensor_type_counts(self) -> Counter[str]:
        return Counter(t.type for t in self.tensors)

    def tensor(self, name: str) -> TensorSummary | None:
        for t in self.tensors:
            if t.name == name:
                return t
        return None

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


def _field_value(fld: Any) -> Any:
    from gguf import GGUFValueType

    if fld.types and fld.types[0] == GGUFValueType.ARRAY:
        n = len(fld.data)
        if n > MAX_INLINE_ARRAY:
            return {"array_length": n}
        return [_plain(v) for v in fld.contents()]
    return _plain(fld.contents())


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_gguf(path: str | Path, *, role: str = "model") -> GGUFInfo:
    """Parse the header and tensor table of ``path``; raise a UserError if it is unusable.

    ``role`` names the file in messages ("model", "projector (mmproj)" ...).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise NotFoundError(f"No such file: {p}")
    if p.is_dir():
        raise CorruptFileError(f"{p} is a folder, not a GGUF {role} file")
    try:
        size = p.stat().st_size
        with p.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise CorruptFileError(f"Cannot read {role} file {p}: {exc.strerror or exc}") from exc
    if magic != GGUF_MAGIC:
        raise CorruptFileError(f"{p} is not a GGUF file (a {role} must be GGUF)")

    from gguf import GGUFReader

    try:
        reader = GGUFReader(p, "r")
    except Exception as exc:  # gguf-py raises ValueError/IndexError/... on damaged headers
        raise CorruptFileError(f"{p} is a damaged or truncated GGUF file: {exc}") from exc

    tensors: list[TensorSummary] = []
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise CorruptFileError(
                f"{p} is truncated: tensor {t.name!r} ends at byte {end} "
                f"but the file has {size} bytes"
            )
        tensors.append(
            TensorSummary(
                name=t.name,
                type=t.tensor_type.name,
                shape=tuple(int(x) for x in t.shape),
                n_bytes=int(t.n_bytes),
            )
        )
    metadata: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = _field_value(fld)
        except Exception as exc:
            raise CorruptFileError(f"{p}: metadata key {key!r} is damaged: {exc}") from exc
    version_field = reader.fields.get("GGUF.version")
    version = int(version_field.contents()) if version_field is not None else 0
    return GGUFInfo(
        path=p, size=size, version=version, metadata=metadata, tensors=tensors, _reader=reader
    )
