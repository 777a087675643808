"""The contract between the converter and a model family, plus the parts LLaVA families share.

A family recognises its checkpoint from ``config.json`` and describes both output files as
plain data: hyper-parameters and an ordered list of :class:`TensorJob` (GGUF name, final
shape, a loader returning float32 in llama.cpp's layout). Quantization, GGUF writing,
tokenizer and atomicity are the converter's business, not the family's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import Checkpoint, TensorRef

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


@dataclass
class VisionHParams:
    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    eps: float
    feature_layer: int  # index into hidden_states (0 = embeddings), non-negative
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    projection_dim: int
    use_gelu: bool  # False = quick-GELU (CLIP)
    projector_type: str = "mlp"

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class FamilyPlan:
    """Everything needed to write both files."""

    family: str
    architecture: str
    text: TextHParams
    text_tensors: list[TensorJob]
    vision: VisionHParams
    vision_tensors: list[TensorJob]
    tokenizer_dir: Path
    default_template: str
    config_ids: dict[str, int | None]
    notes: list[str] = field(default_factory=list)
    vision_source: str = ""
    # Whether text right after an image / special token starts with SentencePiece's "▁"
    # in training (written as mmchat.tokenizer.legacy_spaces for the runtime).
    legacy_spaces: bool = True
    # Extra mmproj metadata a family adds (e.g. LLaVA 1.6's grid pinpoints), written after
    # the standard clip.* keys: str -> string, bool -> bool, int -> uint32, float ->
    # float32, list of ints -> int32 array, list of floats -> float32 array.
    vision_kv: list[tuple[str, Any]] = field(default_factory=list)


class Family(Protocol):
    """A model family: detection from config.json and a plan for both GGUF files."""

    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool: ...

    def plan(
        self, folder: Path, config: dict[str, Any], *, vision_tower: Path | None
    ) -> FamilyPlan: ...


# --- helpers shared by the LLaVA families -------------------------------------------------


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


LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
MISTRAL_DEFAULTS: dict[str, Any] = {
    **LLAMA_DEFAULTS,
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32,
    "sliding_window": 4096,
}
CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def with_defaults(cfg: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    out.update({k: v for k, v in cfg.items() if v is not None})
    return out


def rope_settings(cfg: dict[str, Any]) -> tuple[float, tuple[str, float] | None]:
    """rope_theta and linear scaling from either spelling (``rope_parameters`` in
    transformers 5 configs, ``rope_theta`` + ``rope_scaling`` before)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        factor = params.get("factor", scaling.get("factor"))
        if not isinstance(factor, (int, float)):
            raise UserError("linear RoPE scaling without a numeric factor")
        return float(theta), ("linear", float(factor))
    raise UserError(f"RoPE scaling {kind!r} is not supported for LLaVA text models")


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


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K row order -> llama.cpp's interleaved (GPT-J style) rope order."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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


def llama_text_hparams(cfg: dict[str, Any], *, mistral: bool) -> dict[str, Any]:
    return with_defaults(cfg, MISTRAL_DEFAULTS if mistral else LLAMA_DEFAULTS)


def llama_text_plan(
    ckpt: Checkpoint,
    cfg: dict[str, Any],
    *,
    layer_prefix: str,  # e.g. "model.layers." / "language_model.model.layers."
    embed: str,
    norm: str,
    lm_head: str,
    mistral: bool,
) -> tuple[TextHParams, list[TensorJob]]:
    """Llama/Mistral decoder tensors in llama.cpp's names and layout."""
    c = llama_text_hparams(cfg, mistral=mistral)
    emb = require(ckpt, embed, "token embeddings")
    if len(emb.shape) != 2:
        raise CorruptFileError(f"{embed} must be 2-D, it has shape {list(emb.shape)}")
    n_vocab, n_embd = emb.shape
    n_layer = count_layers(ckpt.names(), re.escape(layer_prefix) + r"(\d+)\.")
    if n_layer == 0:
        raise CorruptFileError(f"The checkpoint has no decoder layers under {layer_prefix!r}")
    n_head = int(c["num_attention_heads"])
    n_head_kv = int(c.get("num_key_value_heads") or n_head)
    head_dim = int(c.get("head_dim") or n_embd // n_head)
    if int(c["hidden_size"]) != n_embd:
        raise CorruptFileError(
            f"config hidden_size {c['hidden_size']} does not match the embeddings' width {n_embd}"
        )
    if int(c["num_hidden_layers"]) != n_layer:
        raise CorruptFileError(
            f"config num_hidden_layers {c['num_hidden_layers']} but the checkpoint has {n_layer}"
        )
    if head_dim % 2 or n_head % n_head_kv:
        raise CorruptFileError(f"unsupported attention shape: {n_head} heads of {head_dim}")
    vocab_cfg = int(c.get("vocab_size") or n_vocab)
    if vocab_cfg != n_vocab:
        raise CorruptFileError(
            f"config vocab_size {vocab_cfg} does not match the embeddings' {n_vocab} rows"
        )
    theta, scaling = rope_settings(c)
    tied = lm_head not in ckpt
    if tied and not c.get("tie_word_embeddings", False):
        raise CorruptFileError(f"The checkpoint has no output head ({lm_head})")

    jobs: list[TensorJob] = [job("token_embd.weight", emb)]
    n_ff = 0
    for i in range(n_layer):
        p = f"{layer_prefix}{i}."

        def g(suffix: str, what: str, _p: str = p) -> TensorRef:
            return require(ckpt, _p + suffix, what)

        q = g("self_attn.q_proj.weight", "attention query")
        k = g("self_attn.k_proj.weight", "attention key")
        v = g("self_attn.v_proj.weight", "attention value")
        o = g("self_attn.o_proj.weight", "attention output")
        gate = g("mlp.gate_proj.weight", "MLP gate")
        up = g("mlp.up_proj.weight", "MLP up")
        down = g("mlp.down_proj.weight", "MLP down")
        n_ff = gate.shape[0]
        expect_shape(q, (n_head * head_dim, n_embd), "attention query")
        expect_shape(k, (n_head_kv * head_dim, n_embd), "attention key")
        expect_shape(v, (n_head_kv * head_dim, n_embd), "attention value")
        expect_shape(o, (n_embd, n_head * head_dim), "attention output")
        expect_shape(up, (n_ff, n_embd), "MLP up")
        expect_shape(down, (n_embd, n_ff), "MLP down")
        b = f"blk.{i}."
        jobs.append(job(b + "attn_norm.weight", g("input_layernorm.weight", "attention norm")))
        jobs.append(job(b + "attn_q.weight", q, partial(_permute_rope, n_head=n_head)))
        jobs.append(job(b + "attn_k.weight", k, partial(_permute_rope, n_head=n_head_kv)))
        jobs.append(job(b + "attn_v.weight", v))
        jobs.append(job(b + "attn_output.weight", o))
        for bias, h in (("q", n_head), ("k", n_head_kv)):
            name = f"{p}self_attn.{bias}_proj.bias"
            if name in ckpt:
                jobs.append(
                    job(f"{b}attn_{bias}.bias", ckpt[name], partial(_permute_rope, n_head=h))
                )
        for bias, out in (("v_proj", "attn_v"), ("o_proj", "attn_output")):
            name = f"{p}self_attn.{bias}.bias"
            if name in ckpt:
                jobs.append(job(f"{b}{out}.bias", ckpt[name]))
        jobs.append(job(b + "ffn_norm.weight", g("post_attention_layernorm.weight", "MLP norm")))
        jobs.append(job(b + "ffn_gate.weight", gate))
        jobs.append(job(b + "ffn_down.weight", down))
        jobs.append(job(b + "ffn_up.weight", up))
    jobs.append(job("output_norm.weight", require(ckpt, norm, "final norm")))
    if not tied:
        head = ckpt[lm_head]
        expect_shape(head, (n_vocab, n_embd), "output head")
        jobs.append(job("output.weight", head))
    sw = c.get("sliding_window")
    hp = TextHParams(
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_ff=n_ff,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ctx=int(c["max_position_embeddings"]),
        rms_eps=float(c["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=int(sw) if mistral and isinstance(sw, int) and sw > 0 else None,
        tied_embeddings=tied,
        base_arch="mistral" if mistral else "llama",
    )
    return hp, jobs


def feature_layer_index(select: Any, n_layer: int) -> int:
    """LLaVA's ``select_layer`` (index into hidden_states, negative from the end) ->
    the non-negative index llama.cpp's ``clip.vision.feature_layer`` expects."""
    if isinstance(select, list):
        if len(select) != 1:
            raise UserError("Several vision feature layers are not supported for LLaVA models")
        select = select[0]
    idx = int(select)
    if idx < 0:
        idx = n_layer + 1 + idx
    if not 1 <= idx <= n_layer:
        raise CorruptFileError(
            f"vision feature layer {select} is out of range for {n_layer} layers"
        )
    return idx


def clip_vision_plan(
    ckpt: Checkpoint,
    vcfg: dict[str, Any],
    *,
    prefix: str,  # "" or "vision_model." or "vision_tower.vision_model." ...
    select_layer: Any,
    image_mean: tuple[float, float, float],
    image_std: tuple[float, float, float],
    projection_dim: int,
) -> tuple[VisionHParams, list[TensorJob]]:
    c = with_defaults(vcfg, CLIP_VISION_DEFAULTS)
    n_layer = count_layers(ckpt.names(), re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    if n_layer == 0:
        raise CorruptFileError(
            f"No CLIP vision encoder layers found (looked for {prefix}encoder.layers.N)"
        )
    if int(c["num_hidden_layers"]) != n_layer:
        raise CorruptFileError(
            f"vision config num_hidden_layers {c['num_hidden_layers']} but the tower has {n_layer}"
        )
    n_embd = int(c["hidden_size"])
    n_ff = int(c["intermediate_size"])
    patch = int(c["patch_size"])
    img = int(c["image_size"])
    n_pos = (img // patch) ** 2 + 1
    act = str(c.get("hidden_act", "quick_gelu"))
    if act not in ("quick_gelu", "gelu"):
        raise UserError(f"CLIP activation {act!r} is not supported (quick_gelu or gelu)")

    def g(suffix: str, what: str) -> TensorRef:
        return require(ckpt, prefix + suffix, what)

    jobs: list[TensorJob] = []
    pe = g("embeddings.patch_embedding.weight", "patch embedding")
    expect_shape(pe, (n_embd, 3, patch, patch), "patch embedding")
    cls = g("embeddings.class_embedding", "class embedding")
    expect_shape(cls, (n_embd,), "class embedding")
    pos = g("embeddings.position_embedding.weight", "position embedding")
    expect_shape(pos, (n_pos, n_embd), "position embedding")
    jobs.append(job("v.class_embd", cls))
    jobs.append(job("v.patch_embd.weight", pe))
    jobs.append(job("v.position_embd.weight", pos))
    # CLIP calls it pre_layrnorm (sic)
    pre = (
        "embeddings.pre_layrnorm."
        if prefix + "embeddings.pre_layrnorm.weight" in ckpt
        else "pre_layrnorm."
    )
    jobs.append(job("v.pre_ln.weight", g(pre + "weight", "pre-layernorm")))
    jobs.append(job("v.pre_ln.bias", g(pre + "bias", "pre-layernorm")))
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.out_proj": "attn_out",
        "layer_norm1": "ln1",
        "layer_norm2": "ln2",
        "mlp.fc1": "ffn_up",
        "mlp.fc2": "ffn_down",
    }
    shapes = {
        "attn_q": (n_embd, n_embd),
        "attn_k": (n_embd, n_embd),
        "attn_v": (n_embd, n_embd),
        "attn_out": (n_embd, n_embd),
        "ffn_up": (n_ff, n_embd),
        "ffn_down": (n_embd, n_ff),
        "ln1": (n_embd,),
        "ln2": (n_embd,),
    }
    for i in range(n_layer):
        for hf, gg in names.items():
            for kind in ("weight", "bias"):
                ref = g(f"encoder.layers.{i}.{hf}.{kind}", f"vision layer {i} {hf}")
                want = shapes[gg] if kind == "weight" else (shapes[gg][0],)
                expect_shape(ref, want, f"vision layer {i}")
                jobs.append(job(f"v.blk.{i}.{gg}.{kind}", ref))
    # The post-layernorm is omitted on purpose: LLaVA reads hidden_states[select_layer],
    # which CLIP's post_layernorm never touches (llama.cpp would apply it to every token).
    hp = VisionHParams(
        image_size=img,
        patch_size=patch,
        n_embd=n_embd,
        n_ff=n_ff,
        n_layer=n_layer,
        n_head=int(c["num_attention_heads"]),
        eps=float(c["layer_norm_eps"]),
        feature_layer=feature_layer_index(select_layer, n_layer),
        image_mean=image_mean,
        image_std=image_std,
        projection_dim=projection_dim,
        use_gelu=act == "gelu",
    )
    return hp, jobs


def mlp_projector_jobs(
    ckpt: Checkpoint,
    *,
    first: str,  # prefix of the first linear, e.g. "multi_modal_projector.linear_1."
    second: str,
    vision_width: int,
    text_width: int,
) -> list[TensorJob]:
    w0 = require(ckpt, first + "weight", "projector layer 1")
    w2 = require(ckpt, second + "weight", "projector layer 2")
    if len(w0.shape) != 2 or len(w2.shape) != 2:
        raise CorruptFileError("The projector weights must be 2-D")
    if w0.shape[1] != vision_width:
        raise UserError(
            f"The projector expects image features of width {w0.shape[1]}, but the vision "
            f"tower produces {vision_width}; the tower does not belong to this model"
        )
    if w2.shape[0] != text_width:
        raise UserError(
            f"The projector outputs width {w2.shape[0]} but the language model's hidden size "
            f"is {text_width}; projector and language model do not match"
        )
    if w2.shape[1] != w0.shape[0]:
        raise CorruptFileError("The projector's two layers have mismatched widths")
    jobs = [job("mm.0.weight", w0)]
    if first + "bias" in ckpt:
        jobs.append(job("mm.0.bias", ckpt[first + "bias"]))
    jobs.append(job("mm.2.weight", w2))
    if second + "bias" in ckpt:
        jobs.append(job("mm.2.bias", ckpt[second + "bias"]))
    return jobs


def image_norm_from(
    folders: Sequence[Path], notes: list[str]
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """image_mean/image_std from preprocessor_config.json or processor_config.json."""
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
    return CLIP_MEAN, CLIP_STD
