"""transformers' own InternVL (``InternVLForConditionalGeneration``, the
``OpenGVLab/InternVL3-*-hf`` layout) with a Qwen2 language model, which llama.cpp's converter
cannot read at the version we pin.

Same two files as NVLM-D (``nvlm.py``): a ``qwen2`` text GGUF and an ``internvit`` vision
GGUF. The differences are names (``vision_tower.*``, ``multi_modal_projector.*``; q/k/v
already split, ``lambda_1/2`` for the layer scale), LayerNorm or RMSNorm per
``norm_type``, optional q/k/v biases and qk-norm, biases on the projector's linears, the
tile bound from the image processor (``max_patches``, 12) and the prompt style ``internvl``:
``<img>`` + the rows of every tile + ``</img>`` (special tokens, no tile tags).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import Checkpoint, TensorRef, open_checkpoint
from .base import FamilyPlan, TensorJob, count_layers, expect_shape, job, read_json_opt, require
from .nvlm import IMAGENET_MEAN, IMAGENET_STD, InternVitVision, mlp1_jobs
from .qwen2_text import CHATML_TEMPLATE, load_bpe_vocab, qwen2_text_plan


def _pair(v: Any, default: int) -> int:
    """image_size / patch_size as transformers 5 writes them ([h, w]) or as an int."""
    if isinstance(v, list):
        if len(v) != 2 or v[0] != v[1]:
            raise UserError(f"non-square InternViT input {v} is not supported")
        return int(v[0])
    return int(v if v is not None else default)


def hf_vision_jobs(
    ckpt: Checkpoint, vcfg: dict[str, Any], p: str
) -> tuple[dict[str, Any], list[TensorJob]]:
    n_layer = count_layers(ckpt.names(), re.escape(p) + r"encoder\.layer\.(\d+)\.")
    if n_layer == 0:
        raise CorruptFileError(f"No vision encoder layers found ({p}encoder.layer.N)")
    if int(vcfg.get("num_hidden_layers", n_layer)) != n_layer:
        raise CorruptFileError(
            f"vision_config num_hidden_layers {vcfg.get('num_hidden_layers')} but the checkpoint "
            f"has {n_layer}"
        )
    if str(vcfg.get("hidden_act", "gelu")) != "gelu":
        raise UserError(f"InternViT activation {vcfg.get('hidden_act')!r} is not supported (gelu)")
    if not vcfg.get("use_mean_pooling", True):
        raise UserError(
            "InternViT with a final LayerNorm (use_mean_pooling false) is not supported"
        )
    norm_type = str(vcfg.get("norm_type", "layer_norm"))
    if norm_type not in ("rms_norm", "layer_norm"):
        raise UserError(f"InternViT norm_type {norm_type!r} is not supported")
    d = int(vcfg.get("hidden_size", 1024))
    ff = int(vcfg.get("intermediate_size", 4096))
    n_head = int(vcfg.get("num_attention_heads", 16))
    img = _pair(vcfg.get("image_size"), 448)
    patch = _pair(vcfg.get("patch_size"), 14)
    qk_norm = bool(vcfg.get("use_qk_norm", False))
    n_pos = (img // patch) ** 2 + 1

    def g(s: str, what: str) -> TensorRef:
        return require(ckpt, p + s, what)

    pe = g("embeddings.patch_embeddings.projection.weight", "patch embedding")
    expect_shape(pe, (d, 3, patch, patch), "patch embedding")
    cls = g("embeddings.cls_token", "class token")
    pos = g("embeddings.position_embeddings", "position embedding")
    if tuple(cls.shape) != (1, 1, d) or tuple(pos.shape) != (1, n_pos, d):
        raise CorruptFileError(
            f"class/position embeddings have shapes {list(cls.shape)}, {list(pos.shape)}"
        )
    jobs = [
        job("v.class_embd", cls, lambda a: a.reshape(d), shape=(d,)),
        job("v.patch_embd.weight", pe),
        job("v.patch_embd.bias", g("embeddings.patch_embeddings.projection.bias", "patch bias")),
        job("v.position_embd.weight", pos, lambda a: a.reshape(n_pos, d), shape=(n_pos, d)),
    ]
    for i in range(n_layer):
        b, t = f"encoder.layer.{i}.", f"v.blk.{i}."

        def opt(name: str, dst: str, shape: tuple[int, ...], _b: str = b) -> None:
            if p + _b + name in ckpt:
                ref = ckpt[p + _b + name]
                expect_shape(ref, shape, name)
                jobs.append(job(dst, ref))

        for hf, gg, shape in (
            ("attention.q_proj", "attn_q", (d, d)),
            ("attention.k_proj", "attn_k", (d, d)),
            ("attention.v_proj", "attn_v", (d, d)),
            ("attention.projection_layer", "attn_out", (d, d)),
            ("mlp.fc1", "ffn_up", (ff, d)),
            ("mlp.fc2", "ffn_down", (d, ff)),
        ):
            w = g(b + hf + ".weight", f"vision layer {i} {hf}")
            expect_shape(w, shape, f"vision layer {i} {hf}")
            jobs.append(job(f"{t}{gg}.weight", w))
            opt(hf + ".bias", f"{t}{gg}.bias", (shape[0],))
        if qk_norm:
            for k in ("q", "k"):
                w = g(b + f"attention.{k}_norm.weight", f"vision layer {i} {k}_norm")
                expect_shape(w, (d,), f"vision layer {i} {k}_norm")
                jobs.append(job(f"{t}attn_{k}_norm.weight", w))
        for hf, gg in (("layernorm_before", "ln1"), ("layernorm_after", "ln2")):
            jobs.append(job(f"{t}{gg}.weight", g(b + hf + ".weight", f"vision layer {i} {hf}")))
            if norm_type == "layer_norm":
                jobs.append(job(f"{t}{gg}.bias", g(b + hf + ".bias", f"vision layer {i} {hf}")))
        for hf, gg in (("lambda_1", "ls1"), ("lambda_2", "ls2")):
            w = g(b + hf, f"vision layer {i} layer scale")
            expect_shape(w, (d,), f"vision layer {i} layer scale")
            jobs.append(job(f"{t}{gg}", w))
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
        "dummy_heads": 0,
    }
    return hp, jobs


class InternVLHF:
    """transformers' ``InternVLForConditionalGeneration`` with a Qwen2 language model."""

    name: ClassVar[str] = "internvl_hf"
    architectures: ClassVar[tuple[str, ...]] = ("InternVLForConditionalGeneration",)

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        archs = config.get("architectures") or []
        return "InternVLForConditionalGeneration" in archs or (
            not archs and config.get("model_type") == "internvl"
        )

    def plan(
        self, folder: Path, config: dict[str, Any], *, vision_tower: Path | None
    ) -> FamilyPlan:
        if vision_tower is not None:
            raise UserError("--vision-tower does not apply to InternVL: it has its own encoder")
        vcfg = dict(config.get("vision_config") or {})
        tcfg = dict(config.get("text_config") or {})
        if tcfg.get("model_type", "qwen2") != "qwen2":
            raise UserError(
                f"InternVL with a {tcfg.get('model_type')!r} language model is not supported "
                "(Qwen2 is)"
            )
        ratio = float(config.get("downsample_ratio", 0.5))
        layer = config.get("vision_feature_layer", -1)
        strategy = config.get("vision_feature_select_strategy", "default")
        if ratio != 0.5 or layer != -1 or strategy != "default":
            raise UserError(
                f"InternVL with downsample_ratio {ratio}, vision_feature_layer {layer}, select "
                f"strategy {strategy!r} is not supported (0.5, -1, default)"
            )
        if str(config.get("projector_hidden_act", "gelu")) != "gelu":
            raise UserError(f"projector activation {config.get('projector_hidden_act')!r}")
        ckpt = open_checkpoint(folder)
        names = set(ckpt.names())
        if any(n.startswith("model.vision_tower.") for n in names):  # a raw state dict
            vp, mp, tp, head = (
                "model.vision_tower.",
                "model.multi_modal_projector.",
                "model.language_model.",
                "lm_head.weight",
            )
        else:  # the hub layout (what save_pretrained writes)
            vp, mp, tp, head = (
                "vision_tower.",
                "multi_modal_projector.",
                "language_model.model.",
                "language_model.lm_head.weight",
            )
        if tcfg.get("tie_word_embeddings") is None:
            tcfg["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
        text_hp, text_jobs = qwen2_text_plan(ckpt, tcfg, prefix=tp, lm_head=head)
        vhp, vis_jobs = hf_vision_jobs(ckpt, vcfg, vp)
        mm_jobs = mlp1_jobs(
            ckpt,
            vhp["n_embd"] * 4,
            text_hp.n_embd,
            names=(mp + "layer_norm", mp + "linear_1", mp + "linear_2"),
            label="the projector",
        )
        proc: dict[str, Any] = {}
        for name in ("preprocessor_config.json", "processor_config.json"):
            data = read_json_opt(folder / name)
            proc = proc or dict(data.get("image_processor") or data)
        min_t = int(proc.get("min_patches", 1))
        max_t = int(proc.get("max_patches", 12)) if proc.get("crop_to_patches", True) else 1
        if not 1 <= min_t <= max_t <= 40:
            raise UserError(f"tile bounds {min_t}..{max_t} are not supported")
        vision = InternVitVision(
            **vhp,
            mean=tuple(proc.get("image_mean") or IMAGENET_MEAN),
            std=tuple(proc.get("image_std") or IMAGENET_STD),
            projection_dim=text_hp.n_embd,
            family=self.name,
            select_layer=-1,
            scale=ratio,
            ps_version="v2",
            mm_eps=1e-5,
            min_tiles=min_t,
            max_tiles=max_t,
            use_thumbnail=True,
            prompt_style="internvl",
        )
        vocab = load_bpe_vocab(
            folder, vocab_size=text_hp.n_vocab, config=tcfg, default_template=CHATML_TEMPLATE
        )
        for tag in ("<img>", "</img>"):
            if tag not in vocab.tokens:
                raise UserError(f"the tokenizer has no {tag} token (InternVL's image wrapper)")
        return FamilyPlan(
            family=self.name,
            architecture="InternVLForConditionalGeneration",
            text=text_hp,
            text_tensors=text_jobs,
            vision=vision,
            vision_tensors=vis_jobs + mm_jobs,
            tokenizer_dir=folder,
            default_template=CHATML_TEMPLATE,
            config_ids={},
            notes=[],
            vision_source="checkpoint",
            legacy_spaces=False,
            add_bos=False,
            vocab=vocab,
        )


FAMILIES = (InternVLHF,)
