"""NVLM-D (``architectures: ["NVLM_D"]``, Hugging Face remote-code layout): InternViT +
pixel shuffle + ``mlp1`` + Qwen2.

Text GGUF: libllama's ``qwen2`` (``qwen2_text``), byte-level BPE vocabulary, chatml.
Vision GGUF: our projector type ``internvit`` (layout: docs/nvlm.md):

* InternViT in CLIP's tensor names, with ``v.blk.N.attn_{q,k}_norm.weight`` (RMS qk-norm
  over the whole q/k, before the head split) and ``v.blk.N.ls{1,2}`` (layer scale); the
  fused ``attn.qkv`` split into q/k/v. NVLM-D pads its 25 heads with 7 "dummy" heads whose
  q/k/v rows and ``proj`` columns are zero (so that 32 heads divide by 8 GPUs) and takes the
  qk-norm variance over the real width only: the converter drops those rows/columns after
  checking that the dummy heads contribute nothing (their v rows or their ``proj`` columns
  are exactly zero), which makes the stripped tower compute exactly what the padded one does.
* ``mlp1`` (LayerNorm -> Linear -> GELU -> Linear, no biases on the linears) as
  ``mm.model.mlp.0.*``, ``mm.model.mlp.1.weight``, ``mm.model.mlp.3.weight``.
* ``internvit.*`` keys record what the graph needs: the norm type, qk-norm, layer scale,
  the pixel-shuffle scale and version, the select layer, the tiling (tile count bounds,
  thumbnail) and the prompt style (``nvlm``: ``<Image>``, ``<tile_k>`` tags, ``</Image>``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import Checkpoint, TensorRef, open_checkpoint
from .base import FamilyPlan, TensorJob, count_layers, expect_shape, job, require
from .qwen2_text import CHATML_TEMPLATE, load_bpe_vocab, qwen2_text_plan

PROJECTOR = "internvit"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InternVitVision:
    """The ``internvit`` vision GGUF's metadata."""

    projector_type = PROJECTOR

    def __init__(self, **kw: Any) -> None:
        self.hp = kw

    @property
    def n_image_tokens(self) -> int:
        """Rows of one tile (an image has 1 tile, or 2-max_tiles + a thumbnail)."""
        g = self.hp["image_size"] // self.hp["patch_size"]
        return int((g * self.hp["scale"]) ** 2)

    def description(self, name: str) -> str:
        return f"InternViT + pixel shuffle + mlp1 of {name} (converted by mmchat)"

    def kv(self) -> list[tuple[str, Any]]:
        h = self.hp
        return [
            ("clip.has_text_encoder", False),
            ("clip.has_vision_encoder", True),
            ("clip.projector_type", PROJECTOR),
            ("clip.use_gelu", True),
            ("clip.vision.image_size", h["image_size"]),
            ("clip.vision.patch_size", h["patch_size"]),
            ("clip.vision.embedding_length", h["n_embd"]),
            ("clip.vision.feed_forward_length", h["n_ff"]),
            ("clip.vision.block_count", h["n_layer"]),
            ("clip.vision.attention.head_count", h["n_head"]),
            ("clip.vision.attention.layer_norm_epsilon", float(h["eps"])),
            ("clip.vision.image_mean", [float(x) for x in h["mean"]]),
            ("clip.vision.image_std", [float(x) for x in h["std"]]),
            ("clip.vision.projection_dim", h["projection_dim"]),
            ("mmchat.vision.family", h["family"]),
            ("mmchat.vision.resize", "bicubic"),
            ("internvit.norm_type", h["norm_type"]),
            ("internvit.qk_norm", h["qk_norm"]),
            ("internvit.layer_scale", True),
            ("internvit.dummy_heads_stripped", h["dummy_heads"]),
            # select_layer -1: the output of the last block (as a count of blocks run)
            ("internvit.layers_run", h["n_layer"] + h["select_layer"] + 1),
            ("internvit.pixel_shuffle.scale", float(h["scale"])),
            ("internvit.pixel_shuffle.version", h["ps_version"]),
            ("internvit.projector.layer_norm_epsilon", float(h["mm_eps"])),
            ("internvit.tiling.min_tiles", h["min_tiles"]),
            ("internvit.tiling.max_tiles", h["max_tiles"]),
            ("internvit.tiling.use_thumbnail", h["use_thumbnail"]),
            ("internvit.prompt_style", h["prompt_style"]),
        ]


def _rows_job(
    name: str,
    ref: TensorRef,
    keep: list[tuple[int, int]],
    zero: list[tuple[int, int]],
    *,
    axis: int = 0,
) -> TensorJob:
    """The ``keep`` row ranges (columns for ``axis=1``) of ``ref``; the ``zero`` ranges
    must be exactly 0 (the dummy heads) or the conversion stops."""

    def cut(a: np.ndarray) -> np.ndarray:
        b = a if axis == 0 else a.T
        for lo, hi in zero:
            if np.any(b[lo:hi]):
                raise CorruptFileError(
                    f"{ref.name}: the padding (dummy) heads are not zero, so dropping them would "
                    "change the result; this checkpoint is not an NVLM-D release"
                )
        out = np.concatenate([b[lo:hi] for lo, hi in keep], axis=0)
        return out if axis == 0 else out.T

    n = sum(hi - lo for lo, hi in keep)
    shape = (n, *ref.shape[1:]) if axis == 0 else (ref.shape[0], n)
    return job(name, ref, cut, shape=tuple(shape))


def _check_v_or_proj(ckpt: Checkpoint, qkv: TensorRef, proj: TensorRef, d: int, dp: int) -> str:
    """Which of (v rows, proj columns) of the dummy heads is zero: one is enough for the
    stripped tower to be exact (q/k of a dummy head never reach a real head: the qk-norm
    variance covers the real width only)."""
    if not np.any(proj.load()[:, d:dp]):
        return "proj"
    if not np.any(qkv.load()[2 * dp + d : 3 * dp]):
        return "v"
    raise CorruptFileError(
        f"{proj.name}: the padding (dummy) heads contribute to the output (neither their v rows "
        "nor their proj columns are zero); this checkpoint is not an NVLM-D release"
    )


def internvit_jobs(
    ckpt: Checkpoint, vcfg: dict[str, Any], *, prefix: str = "vision_model."
) -> tuple[dict[str, Any], list[TensorJob]]:
    """InternViT (``vision_model.*``, InternVL chat / NVLM-D remote-code names)."""
    p = prefix
    n_layer = count_layers(ckpt.names(), re.escape(p) + r"encoder\.layers\.(\d+)\.")
    if n_layer == 0:
        raise CorruptFileError("No vision encoder layers found (vision_model.encoder.layers.N)")
    if int(vcfg.get("num_hidden_layers", n_layer)) != n_layer:
        raise CorruptFileError(
            f"vision_config num_hidden_layers {vcfg.get('num_hidden_layers')} but the checkpoint "
            f"has {n_layer}"
        )
    if str(vcfg.get("hidden_act", "gelu")) != "gelu":
        raise UserError(f"InternViT activation {vcfg.get('hidden_act')!r} is not supported (gelu)")
    norm_type = str(vcfg.get("norm_type", "rms_norm"))
    if norm_type not in ("rms_norm", "layer_norm"):
        raise UserError(f"InternViT norm_type {norm_type!r} is not supported")
    d = int(vcfg.get("hidden_size", 3200))
    n_head = int(vcfg.get("num_attention_heads", 25))
    ff = int(vcfg.get("intermediate_size", 12800))
    patch = int(vcfg.get("patch_size", 14))
    img = int(vcfg.get("image_size", 448))
    if d % n_head or img % patch:
        raise UserError(f"unsupported InternViT shape: width {d}, {n_head} heads, {img}/{patch} px")
    dh = d // n_head
    qk_norm = bool(vcfg.get("qk_normalization", False))
    n_pos = (img // patch) ** 2 + 1

    def g(s: str, what: str) -> TensorRef:
        return require(ckpt, p + s, what)

    pe = g("embeddings.patch_embedding.weight", "patch embedding")
    expect_shape(pe, (d, 3, patch, patch), "patch embedding")
    cls = g("embeddings.class_embedding", "class embedding")
    pos = g("embeddings.position_embedding", "position embedding")
    if int(np.prod(cls.shape)) != d or int(np.prod(pos.shape)) != n_pos * d:
        raise CorruptFileError(
            f"class/position embeddings have shapes {list(cls.shape)}, {list(pos.shape)}; "
            f"expected [1, 1, {d}] and [1, {n_pos}, {d}] at {img} px"
        )
    jobs = [
        job("v.class_embd", cls, lambda a: a.reshape(d), shape=(d,)),
        job("v.patch_embd.weight", pe),
        job("v.patch_embd.bias", g("embeddings.patch_embedding.bias", "patch bias")),
        job("v.position_embd.weight", pos, lambda a: a.reshape(n_pos, d), shape=(n_pos, d)),
    ]
    dummy = 0
    for i in range(n_layer):
        b, t = f"encoder.layers.{i}.", f"v.blk.{i}."
        qkv = g(b + "attn.qkv.weight", f"vision layer {i} qkv")
        if len(qkv.shape) != 2 or qkv.shape[1] != d or qkv.shape[0] % (3 * dh):
            raise CorruptFileError(f"{qkv.name} has shape {list(qkv.shape)}")
        dp = qkv.shape[0] // 3  # padded width (dummy heads included)
        n_dummy = dp // dh - n_head
        if n_dummy < 0:
            raise CorruptFileError(f"{qkv.name} is narrower than {n_head} heads of {dh}")
        dummy = n_dummy
        proj = g(b + "attn.proj.weight", f"vision layer {i} proj")
        expect_shape(proj, (d, dp), f"vision layer {i} proj")
        zero_part = _check_v_or_proj(ckpt, qkv, proj, d, dp) if n_dummy else ""
        for k, part in (("q", 0), ("k", 1), ("v", 2)):
            zero = [(part * dp + d, (part + 1) * dp)] if zero_part == "v" and k == "v" else []
            jobs.append(_rows_job(f"{t}attn_{k}.weight", qkv, [(part * dp, part * dp + d)], zero))
        if p + b + "attn.qkv.bias" in ckpt:
            bias = ckpt[p + b + "attn.qkv.bias"]
            expect_shape(bias, (3 * dp,), f"vision layer {i} qkv bias")
            for k, part in (("q", 0), ("k", 1), ("v", 2)):
                zero = [(part * dp + d, (part + 1) * dp)] if zero_part == "v" and k == "v" else []
                jobs.append(
                    _rows_job(f"{t}attn_{k}.bias", bias, [(part * dp, part * dp + d)], zero)
                )
        zero = [(d, dp)] if zero_part == "proj" else []
        jobs.append(_rows_job(f"{t}attn_out.weight", proj, [(0, d)], zero, axis=1))
        jobs.append(job(f"{t}attn_out.bias", g(b + "attn.proj.bias", f"vision layer {i} proj")))
        if qk_norm:
            for k in ("q", "k"):
                w = g(b + f"attn.{k}_norm.weight", f"vision layer {i} {k}_norm")
                expect_shape(w, (dp,), f"vision layer {i} {k}_norm")
                jobs.append(_rows_job(f"{t}attn_{k}_norm.weight", w, [(0, d)], []))
        for hf, gg, shape in (("mlp.fc1", "ffn_up", (ff, d)), ("mlp.fc2", "ffn_down", (d, ff))):
            w = g(b + hf + ".weight", f"vision layer {i} {hf}")
            expect_shape(w, shape, f"vision layer {i} {hf}")
            jobs += [job(f"{t}{gg}.weight", w), job(f"{t}{gg}.bias", g(b + hf + ".bias", hf))]
        for hf, gg in (("norm1", "ln1"), ("norm2", "ln2")):
            jobs.append(job(f"{t}{gg}.weight", g(b + hf + ".weight", f"vision layer {i} {hf}")))
            if norm_type == "layer_norm":
                jobs.append(job(f"{t}{gg}.bias", g(b + hf + ".bias", f"vision layer {i} {hf}")))
        for ls in ("ls1", "ls2"):
            w = g(b + ls, f"vision layer {i} layer scale")
            expect_shape(w, (d,), f"vision layer {i} layer scale")
            jobs.append(job(f"{t}{ls}", w))
    hp = {
        "image_size": img,
        "patch_size": patch,
        "n_embd": d,
        "n_ff": ff,
        "n_layer": n_layer,
        "n_head": n_head,
        "eps": float(vcfg.get("layer_norm_eps", 1e-6)),
        "norm_type": norm_type,
        "qk_norm": qk_norm,
        "dummy_heads": dummy,
    }
    return hp, jobs


def mlp1_jobs(
    ckpt: Checkpoint,
    width: int,
    n_embd: int,
    *,
    names: tuple[str, str, str] = ("mlp1.0", "mlp1.1", "mlp1.3"),
    label: str = "mlp1",
) -> list[TensorJob]:
    """``mlp1`` = Sequential(LayerNorm, Linear, GELU, Linear) -> ``mm.model.mlp.{0,1,3}``
    (mtmd's names; NVLM-D: no biases on the linears). ``names``: the checkpoint's prefixes of
    the LayerNorm and the two linears (transformers' InternVL calls them otherwise)."""
    norm, first, second = names
    ln_w = require(ckpt, norm + ".weight", "projector LayerNorm")
    expect_shape(ln_w, (width,), "projector LayerNorm (4 x the vision width)")
    up = require(ckpt, first + ".weight", "projector first linear")
    down = require(ckpt, second + ".weight", "projector second linear")
    if len(up.shape) != 2 or up.shape[1] != width:
        raise CorruptFileError(f"{first}.weight has shape {list(up.shape)}")
    if tuple(down.shape) != (n_embd, up.shape[0]):
        raise UserError(
            f"{label} outputs width {down.shape[0]} but the language model's hidden size is "
            f"{n_embd}; they do not belong together"
        )
    jobs = [
        job("mm.model.mlp.0.weight", ln_w),
        job("mm.model.mlp.0.bias", require(ckpt, norm + ".bias", "projector LayerNorm bias")),
        job("mm.model.mlp.1.weight", up),
        job("mm.model.mlp.3.weight", down),
    ]
    for src, dst in (
        (first + ".bias", "mm.model.mlp.1.bias"),
        (second + ".bias", "mm.model.mlp.3.bias"),
    ):
        if src in ckpt:
            jobs.append(job(dst, ckpt[src]))
    return jobs


class NvlmD:
    """NVLM-D (``nvidia/NVLM-D-72B`` layout)."""

    name: ClassVar[str] = "nvlm_d"
    label: ClassVar[str] = "NVLM-D"
    architectures: ClassVar[tuple[str, ...]] = ("NVLM_D",)
    prompt_style: ClassVar[str] = "nvlm"
    default_max_tiles: ClassVar[int] = 6

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        archs = config.get("architectures") or []
        arch = cls.architectures[0]
        return arch in archs or (not archs and config.get("model_type") == arch)

    def plan(
        self, folder: Path, config: dict[str, Any], *, vision_tower: Path | None
    ) -> FamilyPlan:
        if vision_tower is not None:
            raise UserError(
                f"--vision-tower does not apply to {self.label}: it has its own encoder"
            )
        vcfg = dict(config.get("vision_config") or {})
        lcfg = dict(config.get("llm_config") or {})
        llm_arch = (lcfg.get("architectures") or ["Qwen2ForCausalLM"])[0]
        if llm_arch != "Qwen2ForCausalLM" and lcfg.get("model_type") != "qwen2":
            raise UserError(
                f"{self.label} with a {llm_arch} language model is not supported (Qwen2 is)"
            )
        ps = str(config.get("ps_version", "v1"))
        ratio = float(config.get("downsample_ratio", 0.5))
        select = int(config.get("select_layer", -1))
        if ps != "v2" or ratio != 0.5:
            raise UserError(
                f"{self.label} with pixel shuffle {ps} at {ratio} is not supported (v2 at 0.5 is)"
            )
        if select != -1:
            raise UserError(f"select_layer {select} is not supported (only -1, the last block)")
        ckpt = open_checkpoint(folder)
        text_hp, text_jobs = qwen2_text_plan(
            ckpt, lcfg, prefix="language_model.model.", lm_head="language_model.lm_head.weight"
        )
        vhp, vis_jobs = internvit_jobs(ckpt, vcfg)
        img = int(config.get("force_image_size") or vhp["image_size"])
        if img != vhp["image_size"]:
            raise UserError(f"force_image_size {img} differs from the tower's {vhp['image_size']}")
        mm_jobs = mlp1_jobs(ckpt, vhp["n_embd"] * 4, text_hp.n_embd)
        min_t = int(config.get("min_dynamic_patch", 1))
        max_t = (
            int(config.get("max_dynamic_patch", self.default_max_tiles))
            if config.get("dynamic_image_size", True)
            else 1
        )
        if not 1 <= min_t <= max_t <= 40:
            raise UserError(f"dynamic patch bounds {min_t}..{max_t} are not supported")
        vision = InternVitVision(
            **vhp,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            projection_dim=text_hp.n_embd,
            family=self.name,
            select_layer=select,
            scale=ratio,
            ps_version=ps,
            mm_eps=1e-5,
            min_tiles=min_t,
            max_tiles=max_t,
            use_thumbnail=bool(config.get("use_thumbnail", True)),
            prompt_style=self.prompt_style,
        )
        notes = []
        if vhp["dummy_heads"]:
            notes.append(
                f"dropped the vision tower's {vhp['dummy_heads']} zero padding heads "
                "(checked: they contribute nothing)"
            )
        vocab = load_bpe_vocab(
            folder, vocab_size=text_hp.n_vocab, config=lcfg, default_template=CHATML_TEMPLATE
        )
        if self.prompt_style == "internvl":
            for tag in ("<img>", "</img>"):
                if tag not in vocab.tokens:
                    raise UserError(f"the tokenizer has no {tag} token (InternVL's image wrapper)")
        return FamilyPlan(
            family=self.name,
            architecture=self.architectures[0],
            text=text_hp,
            text_tensors=text_jobs,
            vision=vision,
            vision_tensors=vis_jobs + mm_jobs,
            tokenizer_dir=folder,
            default_template=CHATML_TEMPLATE,
            config_ids={},
            notes=notes,
            vision_source="checkpoint",
            legacy_spaces=False,
            add_bos=False,
            vocab=vocab,
        )


class InternVLChat(NvlmD):
    """InternVL's own remote-code layout (``InternVLChatModel``: ``vision_model.*``,
    ``mlp1.*``, ``language_model.*``) with a Qwen2 language model: the NVLM-D path without
    dummy heads, with biases where the checkpoint has them and InternVL's prompt
    (``<img>`` rows ``</img>``)."""

    name: ClassVar[str] = "internvl_chat"
    label: ClassVar[str] = "InternVL"
    architectures: ClassVar[tuple[str, ...]] = ("InternVLChatModel",)
    prompt_style: ClassVar[str] = "internvl"
    default_max_tiles: ClassVar[int] = 12


FAMILIES = (NvlmD, InternVLChat)
