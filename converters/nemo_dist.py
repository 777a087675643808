"""Megatron-core distributed checkpoints (``model_weights/``, torch_dist) inside a ``.nemo``.

Recent NeMo 1.x versions save Megatron-core models as a PyTorch Distributed Checkpoint:
``model_weights/metadata.json`` (``{"sharded_backend": "torch_dist", ...}``), ``.metadata``
(a pickled ``torch.distributed.checkpoint.Metadata``: every tensor's global shape and the
chunks each rank wrote, with their byte ranges) and ``__R_N.distcp`` files (each chunk a
``torch.save`` blob at its offset).

Safety: ``torch.distributed.checkpoint`` itself reads ``.metadata`` with ``pickle.load``; here
it is read by an unpickler that resolves only the checkpoint's own metadata dataclasses,
``torch.Size``, torch dtypes/layouts and paths (anything else is refused), and every chunk
with ``torch.load(weights_only=True)``.

Keys are the global ones Megatron-core writes: the decoder layers are stacked along a
leading layer axis (``model.decoder.layers.self_attention.linear_qkv.weight`` is
[num_layers, rows, cols]) and tensor-parallel shards are chunks of the global tensor (a
swiglu ``linear_fc1`` is [all gates; all ups], or two keys ``…_w`` / ``…_v`` with
singleton shards). They are turned back into the per-layer names of a ``model_weights.ckpt``
(``model.decoder.layers.N.…``), one layer read at a time.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmchat.errors import CorruptFileError, UserError

from .checkpoint import TensorRef

DIST_DIR = "model_weights/"
_STACKED = re.compile(r"^(.*\.decoder\.layers\.)([A-Za-z_].*)$")
_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    *(("pathlib", n) for n in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch":
            import torch

            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        raise CorruptFileError(
            f"the distributed checkpoint's .metadata refers to {module}.{name}, which is not "
            "checkpoint metadata; refused"
        )


@dataclass
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # member name inside the archive
    start: int
    length: int


class DistCheckpoint:
    """Tensors of a torch_dist checkpoint, read chunk by chunk through ``read_range``."""

    def __init__(self, names: list[str], read_member: Callable[[str], bytes],
                 read_range: Callable[[str, int, int], bytes]) -> None:  # fmt: skip
        self._read_range = read_range
        try:
            import torch  # noqa: F401
        except ImportError:
            raise UserError(
                "This .nemo stores a distributed checkpoint (model_weights/); reading it "
                "needs torch (pip install torch), used only with torch.load(weights_only=True)"
            ) from None
        meta_json = DIST_DIR + "metadata.json"
        if meta_json in names:
            try:
                info = json.loads(read_member(meta_json))
            except ValueError as exc:
                raise CorruptFileError(f"{meta_json} is not JSON: {exc}") from exc
            backend = info.get("sharded_backend") if isinstance(info, dict) else None
            if backend != "torch_dist":
                raise UserError(
                    f"This .nemo's distributed checkpoint uses the {backend!r} backend; mmchat "
                    "reads torch_dist (re-save it with NeMo's torch_dist format)"
                )
        if DIST_DIR + ".metadata" not in names:
            raise CorruptFileError("the distributed checkpoint has no model_weights/.metadata")
        try:
            md = _MetadataUnpickler(io.BytesIO(read_member(DIST_DIR + ".metadata"))).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"model_weights/.metadata is damaged: {exc}") from exc
        storage = {}
        for idx, st in md.storage_data.items():
            off = None if idx.offset is None else tuple(int(x) for x in idx.offset)
            storage[(idx.fqn, off)] = st
        self.global_refs: dict[str, tuple[tuple[int, ...], str, list[_Chunk]]] = {}
        for fqn, tmd in md.state_dict_metadata.items():
            if not hasattr(tmd, "chunks"):  # BytesStorageMetadata: _extra_state and the like
                continue
            dtype = _DTYPES.get(str(tmd.properties.dtype).removeprefix("torch."))
            if dtype is None:
                raise CorruptFileError(f"{fqn}: unsupported dtype {tmd.properties.dtype}")
            chunks = []
            for c in tmd.chunks:
                off = tuple(int(x) for x in c.offsets)
                st = storage.get((fqn, off))
                if st is None:
                    raise CorruptFileError(f"{fqn}: a chunk at {off} has no stored data")
                file = DIST_DIR + str(st.relative_path)
                if file not in names:
                    raise CorruptFileError(f"the distributed checkpoint lacks {file}")
                chunks.append(
                    _Chunk(off, tuple(int(x) for x in c.sizes), file, st.offset, st.length)
                )
            self.global_refs[fqn] = (tuple(int(x) for x in tmd.size), dtype, chunks)

    def _load_chunk(self, ch: _Chunk) -> np.ndarray:
        import torch

        blob = self._read_range(ch.file, ch.start, ch.length)
        try:
            t = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CorruptFileError(f"a chunk in {ch.file} cannot be loaded safely: {exc}") from exc
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != ch.sizes:
            raise CorruptFileError(f"a chunk in {ch.file} does not hold the tensor it should")
        arr: np.ndarray = t.to(torch.float32).numpy()
        return arr

    def region(self, fqn: str, layer: int | None) -> np.ndarray:
        """The global tensor ``fqn`` as float32, or its slab ``layer`` along axis 0."""
        shape, _, chunks = self.global_refs[fqn]
        lo = (layer, *[0] * (len(shape) - 1)) if layer is not None else (0,) * len(shape)
        hi = (layer + 1, *shape[1:]) if layer is not None else shape
        out = np.zeros(tuple(h - low for low, h in zip(lo, hi, strict=True)), np.float32)
        covered = 0
        for ch in chunks:
            a = [max(low, o) for low, o in zip(lo, ch.offsets, strict=True)]
            b = [min(h, o + s) for h, o, s in zip(hi, ch.offsets, ch.sizes, strict=True)]
            if any(x >= y for x, y in zip(a, b, strict=True)):
                continue
            data = self._load_chunk(ch)
            src = tuple(slice(x - o, y - o) for x, y, o in zip(a, b, ch.offsets, strict=True))
            dst = tuple(slice(x - low, y - low) for x, y, low in zip(a, b, lo, strict=True))
            out[dst] = data[src]
            covered += int(np.prod([y - x for x, y in zip(a, b, strict=True)]))
        if covered != out.size:
            raise CorruptFileError(f"{fqn}: the stored chunks do not cover the tensor")
        return out[0] if layer is not None else out

    def refs(self) -> dict[str, TensorRef]:
        """Per-layer TensorRefs in the names of a model_weights.ckpt."""
        g = self.global_refs
        # singleton swiglu shards: key_w (all gates) + key_v (all ups) -> key [gates; ups]
        pairs = {f[:-2]: (f, f[:-2] + "_v") for f in g if f.endswith("_w") and f[:-2] + "_v" in g}
        paired = {x for p in pairs.values() for x in p}
        tensors = {f: (shape, dtype) for f, (shape, dtype, _) in g.items() if f not in paired}
        for base, (w, v) in pairs.items():
            (ws, dtype, _), vs = g[w], g[v][0]
            axis = 1 if _STACKED.match(base) else 0
            if len(ws) != len(vs) or any(
                a != b for i, (a, b) in enumerate(zip(ws, vs, strict=True)) if i != axis
            ):
                raise CorruptFileError(f"{base}: the _w and _v halves have different shapes")
            tensors[base] = (
                tuple(
                    a + b if i == axis else a for i, (a, b) in enumerate(zip(ws, vs, strict=True))
                ),
                dtype,
            )
        out: dict[str, TensorRef] = {}
        for fqn, (shape, dtype) in tensors.items():
            itemsize = 2 if dtype in ("BF16", "F16") else 4
            m = _STACKED.match(fqn)
            slabs: list[tuple[str, tuple[int, ...], int | None]]
            if m:
                slabs = [(f"{m.group(1)}{i}.{m.group(2)}", shape[1:], i) for i in range(shape[0])]
            else:
                slabs = [(fqn, shape, None)]
            for name, shp, layer in slabs:
                nbytes = int(np.prod(shp)) * itemsize
                out[name] = TensorRef(name, shp, dtype, nbytes, _Reader(self, fqn, layer, pairs))
        return out


class _Reader:
    def __init__(
        self, dist: DistCheckpoint, fqn: str, layer: int | None, pairs: dict[str, tuple[str, str]]
    ) -> None:
        self.dist, self.fqn, self.layer, self.pairs = dist, fqn, layer, pairs

    def read(self, ref: TensorRef) -> np.ndarray:
        if self.fqn in self.pairs:
            w, v = self.pairs[self.fqn]
            arr = np.concatenate(
                [self.dist.region(w, self.layer), self.dist.region(v, self.layer)], axis=0
            )
        else:
            arr = self.dist.region(self.fqn, self.layer)
        if tuple(arr.shape) != tuple(ref.shape):
            raise CorruptFileError(f"{ref.name}: read shape {arr.shape} != {ref.shape}")
        return arr
