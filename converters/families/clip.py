"""CLIP ViT + LLaVA MLP projector: the vision GGUF layout of the LLaVA families (projector
type ``mlp``), as llama.cpp/Ollama read it and libmmvision's families/clip.cpp runs it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import Checkpoint, TensorRef
from .base import TensorJob, count_layers, expect_shape, job, require, with_defaults

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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

    def description(self, name: str) -> str:
        return f"CLIP vision tower + LLaVA MLP projector of {name} (converted by mmchat)"

    def kv(self) -> list[tuple[str, Any]]:
        return [
            ("clip.has_text_encoder", False),
            ("clip.has_vision_encoder", True),
            ("clip.has_llava_projector", True),
            ("clip.projector_type", self.projector_type),
            ("clip.use_gelu", self.use_gelu),
            ("clip.vision.image_size", self.image_size),
            ("clip.vision.patch_size", self.patch_size),
            ("clip.vision.embedding_length", self.n_embd),
            ("clip.vision.feed_forward_length", self.n_ff),
            ("clip.vision.projection_dim", self.projection_dim),
            ("clip.vision.block_count", self.n_layer),
            ("clip.vision.attention.head_count", self.n_head),
            ("clip.vision.attention.layer_norm_epsilon", float(self.eps)),
            ("clip.vision.image_mean", [float(x) for x in self.image_mean]),
            ("clip.vision.image_std", [float(x) for x in self.image_std]),
            # LLaVA reads hidden_states[select_layer]; with this key llama.cpp runs exactly
            # the blocks before it and (as v.post_ln is not written) applies no post-LN.
            ("clip.vision.feature_layer", [int(self.feature_layer)]),
        ]


def tower_kv(v: VisionHParams, projector_type: str) -> list[tuple[str, Any]]:
    """The ``clip.*`` keys of a CLIP tower whose rows leave at its own width (the
    cross-attention families' vision files: IDEFICS, OpenFlamingo)."""
    return [
        ("clip.has_text_encoder", False),
        ("clip.has_vision_encoder", True),
        ("clip.projector_type", projector_type),
        ("clip.use_gelu", v.use_gelu),
        ("clip.vision.image_size", v.image_size),
        ("clip.vision.patch_size", v.patch_size),
        ("clip.vision.embedding_length", v.n_embd),
        ("clip.vision.feed_forward_length", v.n_ff),
        ("clip.vision.projection_dim", v.n_embd),
        ("clip.vision.block_count", v.n_layer),
        ("clip.vision.attention.head_count", v.n_head),
        ("clip.vision.attention.layer_norm_epsilon", float(v.eps)),
        ("clip.vision.image_mean", [float(x) for x in v.image_mean]),
        ("clip.vision.image_std", [float(x) for x in v.image_std]),
    ]


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
