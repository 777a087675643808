"""Quantize a float (F32/F16/BF16) text GGUF into one of mmchat's types, for ``/api/create``'s
``quantize``: the metadata is copied, ``general.file_type`` is set to the new type, and every
tensor goes through the converter's own per-tensor policy and ggml encoders
(``mmchat.converters.quant``: the same choices ``mmchat convert --quant`` makes).

The output is written to a temporary file by the caller and only enters the store once it
is complete and hashed. Already-quantized sources are refused (quantizing twice loses
quality twice), as Ollama does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mmchat.errors import UserError

Progress = Callable[[int, int], None]  # (bytes of source done, total)


def quant_names() -> list[str]:
    from mmchat.converters.quant import TEXT_QUANTS

    return list(TEXT_QUANTS)


def requantize(src: Path, dst: Path, quant: str, *, progress: Progress | None = None) -> str:
    """Write ``src`` quantized to ``quant`` into ``dst``; return the type's display name."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    from mmchat.converters import quant as Q

    q = Q.TEXT_QUANTS.get(quant.strip().lower())
    if q is None:
        raise UserError(
            f"unknown quantization {quant!r}; choose one of: {', '.join(Q.TEXT_QUANTS)}"
        )
    reader = GGUFReader(src, "r")
    arch_field = reader.fields.get("general.architecture")
    arch = str(arch_field.contents()) if arch_field is not None else ""
    if not arch or arch == "clip":
        raise UserError("only a text model can be quantized (not a projector)")
    floats = (T.F32, T.F16, T.BF16)
    big = [t for t in reader.tensors if len(t.shape) >= 2 and t.tensor_type not in floats]
    if big:
        raise UserError(
            f"quantize needs a model in F32, F16 or BF16; this one is already quantized "
            f"({big[0].tensor_type.name}): create from the float model instead"
        )

    def meta(key: str) -> int | None:
        f = reader.fields.get(f"{arch}.{key}")
        value = f.contents() if f is not None else None
        return int(value) if isinstance(value, int) else None

    n_layer = meta("block_count") or 1
    n_head, n_head_kv = meta("attention.head_count") or 1, meta("attention.head_count_kv")
    n_gqa = max(1, n_head // (n_head_kv or n_head))
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    writer = GGUFWriter(dst, arch)
    total = sum(int(t.n_bytes) for t in reader.tensors)
    done = 0
    try:
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in (
                "general.architecture",
                "general.file_type",
                "general.quantization_version",
            ):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        writer.add_file_type(int(q.ftype))
        writer.add_quantization_version(2)
        planned = []
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))  # numpy order, row last
            kind = Q.text_tensor_type(
                q, t.name, shape, n_layer=n_layer, n_gqa=n_gqa, tied_output=tied
            )
            if kind not in floats and len(shape) < 2:
                kind = T.F32
            planned.append((t, shape, kind))
            writer.add_tensor_info(
                t.name, shape, np.dtype(np.float32), Q.nbytes_for(kind, shape), raw_dtype=kind
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with ThreadPoolExecutor(Q.default_threads()) as pool:
            for t, shape, kind in planned:
                data = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
                writer.write_tensor_data(Q.encode(data.astype(np.float32), kind, pool=pool))
                done += int(t.n_bytes)
                if progress is not None:
                    progress(done, total)
        assert writer.fout is not None
        for fh in writer.fout:
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        writer.close()
    return q.name.upper()
