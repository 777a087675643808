"""IDEFICS v1 (``IdeficsForVisionText2Text``, Flamingo-style): a Llama decoder with gated
cross-attention blocks, an OpenCLIP/CLIP ViT and a Perceiver resampler.

Two files, as for every family (layout: docs/idefics-gguf.md):
- the text GGUF (``general.architecture = llama``): the Llama decoder in llama.cpp's names and
  layout (libllama can read its vocabulary, ``vocab_only``), the decoupled extra embedding and
  lm-head rows appended to ``token_embd`` / ``output`` (so ids ``vocab_size ..`` are the
  added tokens), plus the gated cross-attention block that runs *before* decoder layer ``i``
  as ``blk.{i}.xattn_*`` / ``blk.{i}.xffn_*`` tensors. Those extra tensors make libllama
  refuse a full load on purpose: without them the model is not IDEFICS. mmchat's own decoder
  (native/src/decoder/) runs the file.
- the vision GGUF (``clip.projector_type = idefics``): the ViT (CLIP names, no post-LN:
  IDEFICS reads ``last_hidden_state``) and the Perceiver resampler (``perc.*``); its output
  per image is ``n_latents`` rows of the ViT width, which the decoder's cross-attention reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import Checkpoint, TensorRef, open_checkpoint
from ..tokenizer import legacy_spaces_of
from .base import (
    FamilyPlan,
    TensorJob,
    count_layers,
    expect_shape,
    image_norm_from,
    job,
    read_json_opt,
    require,
)
from .clip import VisionHParams, clip_vision_plan, tower_kv
from .llama_text import llama_text_plan

PROJECTOR = "idefics"
FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"

# IDEFICS (instruct) prompt format: "User:" + image chunks + text + "<end_of_utterance>\n",
# "Assistant: " + reply + "<end_of_utterance>\n". The template writes one
# <fake_token_around_image> before a run of images and one <image> marker per image; the
# runtime lays each image out as its <image> token + <fake_token_around_image>
# (mmchat.runtime.flamingo.idefics_layout), so two images read <fake><image><fake><image><fake>
# as IDEFICS's processor writes them.
_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- set n_images = 0 -%}{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') "
    "| list | length -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ text + 'EOU\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User:' + ('<fake_token_around_image>' "
    "if n_images else '') + '<image>' * n_images + text + 'EOU\\n' }}"
    "{%- else -%}{{ 'Assistant: ' + text + 'EOU\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def idefics_template(has_end_of_utterance: bool) -> str:
    """The chat template: with ``<end_of_utterance>`` when the tokenizer knows it (the
    instruct models), plain newlines otherwise (the base models)."""
    return _TEMPLATE.replace("EOU", END_OF_UTTERANCE if has_end_of_utterance else "")


@dataclass
class IdeficsVision:
    vit: VisionHParams
    use_resampler: bool
    n_latents: int
    depth: int
    n_head: int
    head_dim: int
    qk_norms: bool
    image_token_id: int
    fake_token_id: int
    cross_layer_interval: int
    projector_type: str = PROJECTOR

    @property
    def n_image_tokens(self) -> int:
        return self.n_latents if self.use_resampler else self.vit.n_image_tokens + 1

    def description(self, name: str) -> str:
        return f"CLIP ViT + Perceiver resampler of {name} (IDEFICS, converted by mmchat)"

    def kv(self) -> list[tuple[str, Any]]:
        return [
            *tower_kv(self.vit, self.projector_type),
            ("mmchat.vision.family", "idefics"),
            ("idefics.use_resampler", self.use_resampler),
            ("idefics.perceiver.n_latents", self.n_latents),
            ("idefics.perceiver.block_count", self.depth),
            ("idefics.perceiver.head_count", self.n_head),
            ("idefics.perceiver.head_dim", self.head_dim),
            ("idefics.perceiver.qk_norms", self.qk_norms),
            ("idefics.image_token_id", self.image_token_id),
            ("idefics.fake_token_id", self.fake_token_id),
            ("idefics.cross_layer_interval", self.cross_layer_interval),
        ]


def _concat_rows(refs: list[TensorRef]) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        return np.ascontiguousarray(
            np.concatenate([r.load().astype(np.float32) for r in refs], axis=0)
        )

    return load


def _flat(arr: np.ndarray) -> np.ndarray:
    return arr.reshape(-1)


def _perceiver_jobs(
    ckpt: Checkpoint, pcfg: dict[str, Any], width: int
) -> tuple[int, int, int, int, bool, list[TensorJob]]:
    pre = "model.perceiver_resampler."
    depth = count_layers(ckpt.names(), re.escape(pre) + r"blocks\.(\d+)\.")
    if depth == 0:
        raise CorruptFileError("use_resampler is set but the checkpoint has no perceiver blocks")
    if int(pcfg.get("resampler_depth", depth)) != depth:
        raise CorruptFileError(
            f"perceiver config resampler_depth {pcfg.get('resampler_depth')} but the "
            f"checkpoint has {depth} blocks"
        )
    n_head = int(pcfg.get("resampler_n_heads", 16))
    head_dim = int(pcfg.get("resampler_head_dim", 96))
    inner = n_head * head_dim
    lat = require(ckpt, pre + "latents", "perceiver latents")
    if len(lat.shape) != 2 or lat.shape[1] != width:
        raise CorruptFileError(f"{pre}latents has shape {list(lat.shape)}, width {width} expected")
    n_lat = int(lat.shape[0])
    qk = bool(pcfg.get("qk_layer_norms_perceiver", False))
    jobs = [job("perc.latents", lat)]
    for i in range(depth):
        a, f, b = f"{pre}blocks.{i}.0.", f"{pre}blocks.{i}.1.", f"perc.blk.{i}."
        norms = [
            ("context_layer_norm", "ctx_norm", width),
            ("latents_layer_norm", "lat_norm", width),
        ]
        if qk:
            norms += [("q_layer_norm", "q_norm", head_dim), ("k_layer_norm", "k_norm", head_dim)]
        for hf, gg, n in norms:
            for kind in ("weight", "bias"):
                ref = require(ckpt, f"{a}{hf}.{kind}", f"perceiver block {i} {hf}")
                expect_shape(ref, (n,), f"perceiver block {i} {hf}")
                jobs.append(job(f"{b}{gg}.{kind}", ref))
        for hf, gg, shape in (
            ("q_proj", "attn_q", (inner, width)),
            ("k_proj", "attn_k", (inner, width)),
            ("v_proj", "attn_v", (inner, width)),
            ("output_proj", "attn_out", (width, inner)),
        ):
            ref = require(ckpt, f"{a}{hf}.weight", f"perceiver block {i} {hf}")
            expect_shape(ref, shape, f"perceiver block {i} {hf}")
            jobs.append(job(f"{b}{gg}.weight", ref))
        for kind in ("weight", "bias"):
            ref = require(ckpt, f"{f}ln.{kind}", f"perceiver block {i} MLP norm")
            expect_shape(ref, (width,), f"perceiver block {i} MLP norm")
            jobs.append(job(f"{b}ffn_norm.{kind}", ref))
        up = require(ckpt, f"{f}fc.weight", f"perceiver block {i} MLP fc")
        down = require(ckpt, f"{f}c_proj.weight", f"perceiver block {i} MLP c_proj")
        expect_shape(up, (4 * width, width), f"perceiver block {i} MLP fc")
        expect_shape(down, (width, 4 * width), f"perceiver block {i} MLP c_proj")
        jobs.append(job(f"{b}ffn_up.weight", up))
        jobs.append(job(f"{b}ffn_down.weight", down))
    for kind in ("weight", "bias"):
        ref = require(ckpt, f"{pre}layer_norm.{kind}", "perceiver final norm")
        expect_shape(ref, (width,), "perceiver final norm")
        jobs.append(job(f"perc.post_norm.{kind}", ref))
    return n_lat, depth, n_head, head_dim, qk, jobs


def _cross_jobs(
    ckpt: Checkpoint,
    *,
    n_cross: int,
    interval: int,
    n_embd: int,
    n_ff: int,
    n_head: int,
    vis_width: int,
    qk_norms: bool,
) -> list[TensorJob]:
    head_dim = n_embd // n_head
    jobs: list[TensorJob] = []
    for c in range(n_cross):
        p, b = f"model.gated_cross_attn_layers.{c}.", f"blk.{c * interval}."

        def g(suffix: str, shape: tuple[int, ...], _p: str = p, _c: int = c) -> TensorRef:
            ref = require(ckpt, _p + suffix, f"gated cross-attention block {_c}")
            expect_shape(ref, shape, f"gated cross-attention block {_c} {suffix}")
            return ref

        jobs.append(job(b + "xattn_norm.weight", g("input_layernorm.weight", (n_embd,))))
        jobs.append(job(b + "xattn_q.weight", g("cross_attn.q_proj.weight", (n_embd, n_embd))))
        jobs.append(job(b + "xattn_k.weight", g("cross_attn.k_proj.weight", (n_embd, vis_width))))
        jobs.append(job(b + "xattn_v.weight", g("cross_attn.v_proj.weight", (n_embd, vis_width))))
        jobs.append(job(b + "xattn_out.weight", g("cross_attn.o_proj.weight", (n_embd, n_embd))))
        if qk_norms:
            qn = g("cross_attn.q_layer_norm.weight", (head_dim,))
            kn = g("cross_attn.k_layer_norm.weight", (head_dim,))
            jobs.append(job(b + "xattn_q_norm.weight", qn))
            jobs.append(job(b + "xattn_k_norm.weight", kn))
        for hf, gg in (("alpha_cross_attn", "xattn_alpha"), ("alpha_dense", "xffn_alpha")):
            ref = require(ckpt, p + hf, f"gated cross-attention block {c} {hf}")
            n = int(np.prod(ref.shape)) if ref.shape else 1
            if n not in (1, n_embd):
                raise CorruptFileError(f"{p}{hf} has shape {list(ref.shape)}")
            jobs.append(job(b + gg, ref, _flat, (n,)))
        jobs.append(job(b + "xffn_norm.weight", g("post_attention_layernorm.weight", (n_embd,))))
        jobs.append(job(b + "xffn_gate.weight", g("mlp.gate_proj.weight", (n_ff, n_embd))))
        jobs.append(job(b + "xffn_up.weight", g("mlp.up_proj.weight", (n_ff, n_embd))))
        jobs.append(job(b + "xffn_down.weight", g("mlp.down_proj.weight", (n_embd, n_ff))))
    return jobs


def _added_token_ids(folder: Path) -> dict[str, int]:
    ids: dict[str, int] = {}
    for text, tid in read_json_opt(folder / "added_tokens.json").items():
        if isinstance(tid, int):
            ids[text] = tid
    dec = read_json_opt(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
    if isinstance(dec, dict):
        for key, data in dec.items():
            if isinstance(data, dict) and str(key).isdigit() and "content" in data:
                ids[str(data["content"])] = int(key)
    tj = read_json_opt(folder / "tokenizer.json").get("added_tokens") or []
    for data in tj if isinstance(tj, list) else []:
        if isinstance(data, dict) and isinstance(data.get("id"), int) and "content" in data:
            ids[str(data["content"])] = int(data["id"])
    return ids


class Idefics:
    name: ClassVar[str] = "idefics"
    architectures: ClassVar[tuple[str, ...]] = ("IdeficsForVisionText2Text",)

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        archs = config.get("architectures") or []
        if any(a in cls.architectures for a in archs):
            return True
        return not archs and config.get("model_type") == "idefics"

    def plan(
        self, folder: Path, config: dict[str, Any], *, vision_tower: Path | None
    ) -> FamilyPlan:
        if vision_tower is not None:
            raise UserError("--vision-tower does not apply to IDEFICS: it has its own encoder")
        act = str(config.get("hidden_act", "silu"))
        if act != "silu":
            raise UserError(f"IDEFICS with hidden_act {act!r} is not supported (silu is)")
        ckpt = open_checkpoint(folder)
        text_hp, text_jobs = llama_text_plan(
            ckpt,
            config,
            layer_prefix="model.layers.",
            embed="model.embed_tokens.weight",
            norm="model.norm.weight",
            lm_head="lm_head.weight",
            mistral=False,
        )
        n_base = text_hp.n_vocab
        n_add = int(config.get("additional_vocab_size") or 0)
        if n_add:
            extra_e = require(ckpt, "model.embed_tokens.additional_embedding.weight", "extra rows")
            expect_shape(extra_e, (n_add, text_hp.n_embd), "additional embedding")
            refs_e = [ckpt["model.embed_tokens.weight"], extra_e]
            refs_o = [require(ckpt, "lm_head.weight", "output head")]
            if "lm_head.additional_fc.weight" in ckpt:
                extra_o = ckpt["lm_head.additional_fc.weight"]
            else:  # tied, as _tied_weights_keys allows
                extra_o = extra_e
            expect_shape(extra_o, (n_add, text_hp.n_embd), "additional lm-head rows")
            refs_o.append(extra_o)
            n_vocab = n_base + n_add
            shape = (n_vocab, text_hp.n_embd)
            nb = sum(r.nbytes for r in refs_e)
            for i, jb in enumerate(text_jobs):
                if jb.name == "token_embd.weight":
                    text_jobs[i] = TensorJob(jb.name, shape, nb, _concat_rows(refs_e))
                elif jb.name == "output.weight":
                    nbo = sum(r.nbytes for r in refs_o)
                    text_jobs[i] = TensorJob(jb.name, shape, nbo, _concat_rows(refs_o))
            if text_hp.tied_embeddings:
                raise UserError("IDEFICS with tied input/output embeddings is not supported")
            text_hp.n_vocab = n_vocab

        vcfg = dict(config.get("vision_config") or {})
        vcfg.setdefault("hidden_size", vcfg.get("embed_dim", 768))
        vcfg.setdefault("hidden_act", "gelu")
        vcfg.setdefault("patch_size", 14)
        vcfg.setdefault("image_size", 224)
        vcfg.setdefault("intermediate_size", 5120)
        vcfg.setdefault("num_hidden_layers", 32)
        vcfg.setdefault("num_attention_heads", 16)
        notes: list[str] = []
        mean, std = image_norm_from([folder], notes)
        vit, vis_jobs = clip_vision_plan(
            ckpt,
            vcfg,
            prefix="model.vision_model.",
            select_layer=-1,
            image_mean=mean,
            image_std=std,
            projection_dim=int(vcfg["hidden_size"]),
        )
        width = vit.n_embd
        use_resampler = bool(config.get("use_resampler", False))
        pcfg = dict(config.get("perceiver_config") or {})
        n_lat, depth, p_head, p_hd, p_qk = 0, 0, 0, 0, False
        if use_resampler:
            n_lat, depth, p_head, p_hd, p_qk, pjobs = _perceiver_jobs(ckpt, pcfg, width)
            vis_jobs += pjobs

        interval = int(config.get("cross_layer_interval", 1))
        if interval < 1:
            raise CorruptFileError(f"cross_layer_interval {interval} must be >= 1")
        n_cross = text_hp.n_layer // interval
        found = count_layers(ckpt.names(), r"model\.gated_cross_attn_layers\.(\d+)\.")
        if found != n_cross:
            raise CorruptFileError(
                f"The checkpoint has {found} gated cross-attention blocks; {text_hp.n_layer} "
                f"layers with cross_layer_interval {interval} need {n_cross}"
            )
        text_jobs += _cross_jobs(
            ckpt,
            n_cross=n_cross,
            interval=interval,
            n_embd=text_hp.n_embd,
            n_ff=text_hp.n_ff,
            n_head=text_hp.n_head,
            vis_width=width,
            qk_norms=bool(config.get("qk_layer_norms", False)),
        )

        added = _added_token_ids(folder)
        for tok in (FAKE_TOKEN, IMAGE_TOKEN):
            tid = added.get(tok)
            if tid is None or not 0 <= tid < text_hp.n_vocab:
                raise UserError(
                    f"The tokenizer in {folder} has no {tok} token inside the model's "
                    f"{text_hp.n_vocab} rows; it is not an IDEFICS tokenizer"
                )
        legacy, tok_notes = legacy_spaces_of(folder)
        notes += tok_notes
        eou = added.get(END_OF_UTTERANCE)
        has_eou = eou is not None and eou < text_hp.n_vocab
        vision = IdeficsVision(
            vit=vit,
            use_resampler=use_resampler,
            n_latents=n_lat,
            depth=depth,
            n_head=p_head,
            head_dim=p_hd,
            qk_norms=p_qk,
            image_token_id=added[IMAGE_TOKEN],
            fake_token_id=added[FAKE_TOKEN],
            cross_layer_interval=interval,
        )
        return FamilyPlan(
            family=self.name,
            architecture=self.architectures[0],
            text=text_hp,
            text_tensors=text_jobs,
            vision=vision,
            vision_tensors=vis_jobs,
            tokenizer_dir=folder,
            default_template=idefics_template(has_eou),
            config_ids={
                "bos_token_id": config.get("bos_token_id"),
                "eos_token_id": config.get("eos_token_id"),
                "pad_token_id": config.get("pad_token_id"),
            },
            notes=notes,
            legacy_spaces=legacy,
        )


FAMILIES: tuple[type[Idefics], ...] = (Idefics,)
