"""Facts about the GGUF parts of a model, for manifests, ``list``, ``show`` and ``create``.

Everything here reads headers through :func:`mmchat.gguf_meta.read_gguf`; no tensor data
is loaded. The summaries are stored in the manifest when a model is registered, so
``mmchat list`` never opens a GGUF file.
"""

from __future__ import annotations

import math
import re
from typing import Any

from mmchat.errors import UserError
from mmchat.gguf_meta import GGUFInfo, read_gguf

_MM_INDEX = re.compile(r"(\d+)")


def quant_name(info: GGUFInfo) -> str:
    """``Q4_K_M``, ``F16`` ...: ``general.file_type`` or, if absent, the main tensor type."""
    ftype = info.get("general.file_type")
    if isinstance(ftype, int):
        from gguf import LlamaFileType

        try:
            name = LlamaFileType(ftype).name
        except ValueError:
            name = ""
        for prefix in ("MOSTLY_", "ALL_"):
            if name.startswith(prefix):
                return name[len(prefix) :]
    counts: dict[str, int] = {}
    for t in info.tensors:
        if len(t.shape) >= 2:
            counts[t.type] = counts.get(t.type, 0) + t.n_bytes
    if not counts:
        return "unknown"
    return max(counts, key=lambda k: counts[k])


def param_count(info: GGUFInfo) -> int:
    return sum(math.prod(t.shape) for t in info.tensors)


def format_params(n: int | None) -> str:
    if not n:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)


def _natural_key(name: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in _MM_INDEX.split(name))


def projector_widths(info: GGUFInfo) -> list[int]:
    """Candidate output widths of a projector, most trustworthy first.

    The last ``mm.*`` 2-D weight's output dimension comes first: old LLaVA converters
    write CLIP's own ``projection_dim`` (768) into ``clip.vision.projection_dim``, which
    is not the width the language model receives. Newer converters write the language
    model's width there, so it is a fallback.
    """
    widths: list[int] = []
    mm = [t for t in info.tensors if t.name.startswith("mm.") and t.name.endswith(".weight")]
    mm = [t for t in mm if len(t.shape) == 2]
    if mm:
        last = max(mm, key=lambda t: _natural_key(t.name))
        widths.append(int(last.shape[1]))  # ggml order: (in, out)
    for key in ("clip.vision.projection_dim", "clip.audio.projection_dim"):
        value = info.get(key)
        if isinstance(value, int) and value not in widths:
            widths.append(value)
    return widths


def _projector_type(info: GGUFInfo) -> str | None:
    for key in ("clip.projector_type", "clip.vision.projector_type", "clip.audio.projector_type"):
        value = info.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def tokens_per_image(info: GGUFInfo) -> int | None:
    """Image tokens the projector produces for one image (one tile), when fixed."""
    image_size = info.get("clip.vision.image_size")
    patch_size = info.get("clip.vision.patch_size")
    if not isinstance(image_size, int) or not isinstance(patch_size, int) or patch_size <= 0:
        return None
    side = image_size // patch_size
    ptype = (_projector_type(info) or "mlp").lower()
    if ptype in ("mlp", "mlp_norm"):
        return side * side
    if ptype == "qformer":  # the learned queries, whatever the image
        queries = info.get("qformer.query_count")
        return int(queries) if isinstance(queries, int) else None
    if ptype == "eva_concat":  # MiniGPT-v2 / MiniGPT-4 (Llama 2): n patch rows side by side
        rows = info.get("mmchat.vision.concat_rows")
        return side * side // rows if isinstance(rows, int) and rows > 0 else None
    if ptype in ("ldp", "ldpv2", "internvl", "internvit"):  # 2x2 merge / pixel shuffle 0.5
        return (side // 2) ** 2
    if ptype in ("gemma3", "idefics3", "llama4", "lfm2"):
        scale = info.get("clip.vision.projector.scale_factor")
        if not isinstance(scale, int) and ptype == "gemma3":
            scale = 4  # Gemma 3 pools 4x4 patches into one token
        if isinstance(scale, int) and scale > 0:
            return (side // scale) ** 2
        return None
    return None  # qwen2vl/qwen2.5vl/pixtral...: depends on the image size


def has_vision(info: GGUFInfo) -> bool:
    flag = info.get("clip.has_vision_encoder")
    if isinstance(flag, bool):
        return flag
    return any(t.name.startswith("v.") for t in info.tensors)


def has_audio(info: GGUFInfo) -> bool:
    flag = info.get("clip.has_audio_encoder")
    if isinstance(flag, bool):
        return flag
    return any(t.name.startswith("a.") for t in info.tensors)


def summarize_model(info: GGUFInfo) -> dict[str, Any]:
    """The text model's facts stored in the manifest."""
    return {
        "architecture": info.architecture,
        "name": info.get("general.name"),
        "quant": quant_name(info),
        "parameters": param_count(info),
        "context_length": info.arch_key("context_length"),
        "embedding_length": info.arch_key("embedding_length"),
        "block_count": info.arch_key("block_count"),
        "chat_template": "tokenizer.chat_template" in info.metadata,
        "pooling": info.arch_key("pooling_type"),  # set: a dedicated embedding model
    }


def summarize_projector(info: GGUFInfo) -> dict[str, Any]:
    """The projector's facts stored in the manifest."""
    widths = projector_widths(info)
    return {
        "architecture": info.architecture,
        "projector_type": _projector_type(info),
        "quant": quant_name(info),
        "parameters": param_count(info),
        "vision": has_vision(info),
        "audio": has_audio(info),
        "image_size": info.get("clip.vision.image_size"),
        "patch_size": info.get("clip.vision.patch_size"),
        "tokens_per_image": tokens_per_image(info),
        "anyres": "clip.vision.image_grid_pinpoints" in info.metadata,
        "max_tiles": info.get("internvit.tiling.max_tiles"),
        "width": widths[0] if widths else None,
    }


def check_text_model(info: GGUFInfo) -> None:
    if info.is_mmproj:
        raise UserError(
            f"{info.path} is a projector (mmproj, architecture 'clip'), not a text model; "
            "pass it with --mmproj"
        )
    if not info.architecture:
        raise UserError(f"{info.path} has no general.architecture: not a llama.cpp model")


def check_projector(info: GGUFInfo) -> None:
    if not info.is_mmproj:
        raise UserError(
            f"{info.path} is a text model (architecture {info.architecture!r}), not a "
            "projector: an mmproj file has general.architecture = 'clip'"
        )
    if not (has_vision(info) or has_audio(info)):
        raise UserError(f"{info.path} has neither a vision nor an audio encoder")


CROSS_ATTENTION_PROJECTORS = ("idefics", "openflamingo")


def check_pair(model: GGUFInfo, mmproj: GGUFInfo | None) -> None:
    """Both files have the right roles and the projector feeds the model's width."""
    check_text_model(model)
    if mmproj is None:
        return
    check_projector(mmproj)
    if _projector_type(mmproj) in CROSS_ATTENTION_PROJECTORS:
        return  # its rows feed the decoder's cross-attention, at the vision width
    n_embd = model.arch_key("embedding_length")
    widths = projector_widths(mmproj)
    if isinstance(n_embd, int) and widths and n_embd not in widths:
        raise UserError(
            f"The projector {mmproj.path.name} outputs width {widths[0]} but the text model "
            f"{model.path.name} has {model.architecture}.embedding_length = {n_embd}: "
            "the mmproj belongs to a different model"
        )


def read_pair(model: Any, mmproj: Any | None) -> tuple[GGUFInfo, GGUFInfo | None]:
    """Read and validate a text model and an optional projector."""
    model_info = read_gguf(model, role="model")
    mmproj_info = read_gguf(mmproj, role="projector (mmproj)") if mmproj is not None else None
    check_pair(model_info, mmproj_info)
    return model_info, mmproj_info
