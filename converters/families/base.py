"""The contract between the converter and a model family, plus helpers every family uses.

A family (one module in this package, registered in ``__init__.FAMILIES``) recognises its
checkpoint from ``config.json`` and describes both output files as plain data
(:class:`FamilyPlan`): the text model's hyper-parameters and an ordered list of
:class:`TensorJob` (GGUF name, final shape, a loader returning float32 in llama.cpp's layout),
and a :class:`VisionSpec` (the vision GGUF's ``clip.*`` keys, its projector type) with its
tensor jobs. Quantization, GGUF writing, tokenizer and atomicity are the converter's
business, not the family's.

Shared pieces live next to this module: ``llama_text`` (a Llama/Mistral decoder for
libllama), ``clip`` (CLIP ViT + LLaVA projector keys and tensors).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from mmchat.errors import CorruptFileError

from ..checkpoint import Checkpoint, TensorRef


@dataclass
class TensorJob:
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # numpy order, row length last
    source_bytes: int
    load: Callable[[], np.ndarray]  # float32, already in the GGUF layout


@dataclass
class TextHParams:
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope_scaling: tuple[str, float] | None = None  # ("linear", factor)
    sliding_window: int | None = None
    tied_embeddings: bool = False
    base_arch: str = "llama"  # "llama" or "mistral" (both written as llama.cpp's llama)
    # libllama architecture of the text GGUF ("llama"; "nemotron": LayerNorm with eps
    # layer_norm_epsilon, squared ReLU, rotary on the first rope_dim dims of each head)
    gguf_arch: str = "llama"
    rope_dim: int | None = None  # None: head_dim
    # tokenizer.ggml.add_space_prefix (None: not written, llama.cpp's default true)
    add_space_prefix: bool | None = None


class VisionSpec(Protocol):
    """What the converter needs to know about a family's vision GGUF."""

    projector_type: str  # clip.projector_type: picks the family in libmmvision

    @property
    def n_image_tokens(self) -> int:
        """Embedding rows one image becomes (for the summary)."""
        ...

    def description(self, name: str) -> str:
        """general.description of the vision file."""
        ...

    def kv(self) -> list[tuple[str, Any]]:
        """The family's metadata (``clip.*`` keys), written in this order (see
        ``FamilyPlan.vision_kv`` for how values map to GGUF types)."""
        ...


@dataclass
class FamilyPlan:
    """Everything needed to write both files."""

    family: str
    architecture: str
    text: TextHParams
    text_tensors: list[TensorJob]
    vision: VisionSpec
    vision_tensors: list[TensorJob]
    tokenizer_dir: Path
    default_template: str
    config_ids: dict[str, int | None]
    notes: list[str] = field(default_factory=list)
    vision_source: str = ""
    # Whether text right after an image / special token starts with SentencePiece's "▁"
    # in training (written as mmchat.tokenizer.legacy_spaces for the runtime).
    legacy_spaces: bool = True
    # The text right after an image starts with "▁" (None: as after special tokens);
    # written as mmchat.tokenizer.space_after_image.
    space_after_image: bool | None = None
    # Extra mmproj metadata a family adds (e.g. LLaVA 1.6's grid pinpoints), written after
    # the vision spec's own keys: str -> string, bool -> bool, int -> uint32, float ->
    # float32, list of ints -> int32 array, list of floats -> float32 array, list of str ->
    # string array.
    vision_kv: list[tuple[str, Any]] = field(default_factory=list)
    # Overrides the tokenizer's add_bos_token (None: keep it); a family whose template
    # places BOS itself (BLIP-2: image rows before BOS) writes False.
    add_bos: bool | None = None
    # The text GGUF's vocabulary when the family reads it itself (a byte-level BPE, Qwen2);
    # None: the converter reads the SentencePiece vocabulary from tokenizer_dir.
    vocab: Any = None
    # Extra text-GGUF metadata of an architecture other than llama's (T5's relative
    # buckets, decoder start token, Unigram scores and charsmap), written after the common
    # keys as vision_kv is (bytes -> uint8 array).
    text_kv: list[tuple[str, Any]] = field(default_factory=list)


class Family(Protocol):
    """A model family: detection from config.json and a plan for both GGUF files."""

    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool: ...

    def plan(
        self, folder: Path, config: dict[str, Any], *, vision_tower: Path | None
    ) -> FamilyPlan: ...


# --- helpers every family uses -------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CorruptFileError(f"Cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise CorruptFileError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} does not hold a JSON object")
    return data


def read_json_opt(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def with_defaults(cfg: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    out.update({k: v for k, v in cfg.items() if v is not None})
    return out


def count_layers(names: Sequence[str], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for n in names if (m := rx.match(n))}
    if not found:
        return 0
    n = max(found) + 1
    missing = sorted(set(range(n)) - found)
    if missing:
        raise CorruptFileError(f"The checkpoint lacks layer(s) {missing[:5]} (of {n})")
    return n


def _loader(
    ref: TensorRef, transform: Callable[[np.ndarray], np.ndarray] | None = None
) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        arr = ref.load()
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        if transform is not None:
            arr = transform(arr)
        return np.ascontiguousarray(arr)

    return load


def job(
    gguf_name: str,
    ref: TensorRef,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    shape: tuple[int, ...] | None = None,
) -> TensorJob:
    return TensorJob(gguf_name, shape or ref.shape, ref.nbytes, _loader(ref, transform))


def require(ckpt: Checkpoint, name: str, what: str) -> TensorRef:
    if name not in ckpt:
        raise CorruptFileError(f"The checkpoint has no tensor {name!r} ({what})")
    return ckpt[name]


def expect_shape(ref: TensorRef, shape: tuple[int, ...], what: str) -> None:
    if tuple(ref.shape) != tuple(shape):
        raise CorruptFileError(
            f"Tensor {ref.name!r} ({what}) has shape {list(ref.shape)}, expected {list(shape)} "
            "from the model config"
        )


Float3 = tuple[float, float, float]


def image_norm_from(
    folders: Sequence[Path],
    notes: list[str],
    default_mean: Float3 = (0.48145466, 0.4578275, 0.40821073),
    default_std: Float3 = (0.26862954, 0.26130258, 0.27577711),
) -> tuple[Float3, Float3]:
    """image_mean/image_std from preprocessor_config.json or processor_config.json (CLIP's
    normalisation, which BLIP-2 and LLaVA both use, when neither file has them)."""
    for folder in folders:
        for name in ("preprocessor_config.json", "processor_config.json"):
            data = read_json_opt(folder / name)
            for d in (data, data.get("image_processor") or {}):
                mean, std = d.get("image_mean"), d.get("image_std")
                if (
                    isinstance(mean, list)
                    and isinstance(std, list)
                    and len(mean) == 3
                    and len(std) == 3
                ):
                    return (
                        (float(mean[0]), float(mean[1]), float(mean[2])),
                        (float(std[0]), float(std[1]), float(std[2])),
                    )
    notes.append("no image processor config found; using CLIP's image mean/std")
    return default_mean, default_std


# The CLIP/LLaVA and Llama pieces moved to their own modules (clip.py, llama_text.py); the
# LLaVA families still import them from here.
from .clip import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    VisionHParams,
    clip_vision_plan,
    feature_layer_index,
    mlp_projector_jobs,
)
from .llama_text import llama_text_hparams, llama_text_plan, rope_settings  # noqa: E402

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "Family",
    "FamilyPlan",
    "TensorJob",
    "TextHParams",
    "VisionHParams",
    "VisionSpec",
    "clip_vision_plan",
    "count_layers",
    "expect_shape",
    "feature_layer_index",
    "image_norm_from",
    "job",
    "llama_text_hparams",
    "llama_text_plan",
    "mlp_projector_jobs",
    "read_json",
    "read_json_opt",
    "require",
    "rope_settings",
    "with_defaults",
]
