"""BLIP-2 and InstructBLIP (Hugging Face ``Blip2ForConditionalGeneration``,
``InstructBlipForConditionalGeneration``) with a Llama/Vicuna language model.

The text GGUF is libllama's ``llama`` (shared ``llama_text`` plan); the vision GGUF has our
projector type ``qformer`` (layout: docs/vision-gguf.md): the EVA ViT in CLIP's tensor
names (q/k/v split from the fused ``qkv``; EVA has no k bias), ``ln_vision`` as
``v.post_ln``, the Q-Former under ``qf.*``, the language projection as ``mm.proj``, and for
InstructBLIP the Q-Former's WordPiece vocabulary (``qformer_tokenizer/``) as
``qformer.tokenizer.*`` keys. The chat template written into the text GGUF places the query
rows before BOS, as both models were trained: BLIP-2 ``<rows><s>Question: … Answer:``,
InstructBLIP ``<rows><s>{instruction}``; the text GGUF asks for no automatic BOS.

With a Flan-T5 language model the text GGUF is llama.cpp's ``t5`` (t5_text.py: tensors,
Unigram vocabulary, the templates ending the encoder input with ``</s>``); the runtime feeds
rows and prompt to its encoder (mmchat/runtime/encdec.py). OPT (BLIP-2 OPT) has no llama.cpp
architecture: refused in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mmchat.errors import CorruptFileError, UserError
from mmchat.vision.wordpiece import WordPiece, read_wordpiece_folder

from ..checkpoint import Checkpoint, TensorRef, open_checkpoint
from .base import (
    FamilyPlan,
    TensorJob,
    TextHParams,
    count_layers,
    expect_shape,
    image_norm_from,
    job,
    require,
)
from .llama_text import llama_text_plan
from .t5_text import BLIP2_T5_TEMPLATE, INSTRUCTBLIP_T5_TEMPLATE, t5_text_plan, t5_vocab

PROJECTOR = "qformer"
# LAVIS' InstructBLIP truncates the Q-Former instruction to its last 128 tokens
QFORMER_MAX_TEXT = 128

_PARTS = (
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') "
    "| list | length -%}"
    "{%- endif -%}"
)
# BLIP-2: "<query rows><s>Question: {q} Answer:" (+ " {a} Question: … Answer:" for later
# turns); a system text, which BLIP-2 has none of, goes right after BOS.
BLIP2_TEMPLATE = (
    "{%- set ns = namespace(started=false) -%}"
    "{%- for message in messages -%}" + _PARTS + "{{- '<image>' * n_images -}}"
    "{%- if not ns.started -%}{{- bos_token -}}{%- set ns.started = true -%}"
    "{%- elif message['role'] != 'assistant' -%}{{- ' ' -}}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{- text -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'Question: ' + text + ' Answer:' -}}"
    "{%- else -%}{{- ' ' + text -}}{%- endif -%}"
    "{%- endfor -%}"
)
# InstructBLIP (Vicuna): "<query rows><s>{instruction}", turns joined by a space.
INSTRUCTBLIP_TEMPLATE = (
    "{%- set ns = namespace(started=false) -%}"
    "{%- for message in messages -%}" + _PARTS + "{{- '<image>' * n_images -}}"
    "{%- if not ns.started -%}{{- bos_token -}}{%- set ns.started = true -%}"
    "{%- else -%}{{- ' ' -}}{%- endif -%}"
    "{{- text -}}"
    "{%- endfor -%}"
)


@dataclass
class QformerVision:
    """The ``qformer`` vision GGUF's metadata (docs/vision-gguf.md)."""

    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    eps: float
    ln_vision_eps: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    qf_n_embd: int
    qf_n_ff: int
    qf_n_layer: int
    qf_n_head: int
    qf_eps: float
    cross_attention_frequency: int
    n_query: int
    projection_dim: int
    family: str
    tokenizer: WordPiece | None = None
    text_positions: int = 0  # rows of the Q-Former's position table (InstructBLIP)
    projector_type: str = PROJECTOR
    extra: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def n_image_tokens(self) -> int:
        return self.n_query

    def description(self, name: str) -> str:
        return f"EVA ViT + Q-Former + language projection of {name} (converted by mmchat)"

    def kv(self) -> list[tuple[str, Any]]:
        kv: list[tuple[str, Any]] = [
            ("clip.has_text_encoder", False),
            ("clip.has_vision_encoder", True),
            ("clip.projector_type", self.projector_type),
            ("clip.use_gelu", True),
            ("clip.vision.image_size", self.image_size),
            ("clip.vision.patch_size", self.patch_size),
            ("clip.vision.embedding_length", self.n_embd),
            ("clip.vision.feed_forward_length", self.n_ff),
            ("clip.vision.block_count", self.n_layer),
            ("clip.vision.attention.head_count", self.n_head),
            ("clip.vision.attention.layer_norm_epsilon", float(self.eps)),
            ("clip.vision.image_mean", [float(x) for x in self.image_mean]),
            ("clip.vision.image_std", [float(x) for x in self.image_std]),
            ("clip.vision.projection_dim", self.projection_dim),
            ("mmchat.vision.family", self.family),
            ("mmchat.vision.resize", "bicubic"),
            ("qformer.ln_vision.layer_norm_epsilon", float(self.ln_vision_eps)),
            ("qformer.embedding_length", self.qf_n_embd),
            ("qformer.feed_forward_length", self.qf_n_ff),
            ("qformer.block_count", self.qf_n_layer),
            ("qformer.attention.head_count", self.qf_n_head),
            ("qformer.attention.layer_norm_epsilon", float(self.qf_eps)),
            ("qformer.cross_attention_frequency", self.cross_attention_frequency),
            ("qformer.query_count", self.n_query),
            ("qformer.text_input", self.tokenizer is not None),
        ]
        if self.tokenizer is not None:
            t = self.tokenizer
            kv += [
                ("qformer.text.max_length", min(QFORMER_MAX_TEXT, self.text_positions)),
                ("qformer.tokenizer.model", "wordpiece"),
                ("qformer.tokenizer.tokens", list(t.tokens)),
                ("qformer.tokenizer.do_lower_case", t.do_lower_case),
                ("qformer.tokenizer.unk_token", t.unk),
                ("qformer.tokenizer.cls_token", t.cls),
                ("qformer.tokenizer.sep_token", t.sep),
            ]
        return kv + self.extra


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1) or (1,)


def _flat_job(name: str, ref: TensorRef, want: tuple[int, ...]) -> TensorJob:
    """A tensor whose HF shape has leading 1s ([1, 1, H], [1, N, H]) written as ``want``."""
    if _squeeze(tuple(ref.shape)) != _squeeze(want):
        raise CorruptFileError(f"{ref.name} has shape {list(ref.shape)}, expected {list(want)}")
    return job(name, ref, lambda a: a.reshape(want), shape=want)


def _rows(ref: TensorRef, part: int, n: int) -> TensorJob:
    """Rows [part*n, (part+1)*n) of a fused qkv weight/bias."""

    def cut(a: np.ndarray) -> np.ndarray:
        return a[part * n : (part + 1) * n]

    shape = (n, *tuple(ref.shape)[1:])
    return job("", ref, cut, shape=shape)


def _named(j: TensorJob, name: str) -> TensorJob:
    j.name = name
    return j


def eva_vision_jobs(
    ckpt: Checkpoint, vcfg: dict[str, Any]
) -> tuple[dict[str, Any], list[TensorJob]]:
    """EVA ViT + ln_vision (``vision_model.*``) in CLIP's GGUF names."""
    p = "vision_model."
    n_layer = count_layers(ckpt.names(), re.escape(p) + r"encoder\.layers\.(\d+)\.")
    if n_layer == 0:
        raise CorruptFileError("No vision encoder layers found (vision_model.encoder.layers.N)")
    if int(vcfg.get("num_hidden_layers", n_layer)) != n_layer:
        raise CorruptFileError(
            f"vision config num_hidden_layers {vcfg.get('num_hidden_layers')} but the "
            f"checkpoint has {n_layer}"
        )
    act = str(vcfg.get("hidden_act", "gelu"))
    if act != "gelu":
        raise UserError(f"vision activation {act!r} is not supported (BLIP-2 uses exact gelu)")
    h = int(vcfg.get("hidden_size", 1408))
    ff = int(vcfg.get("intermediate_size", 6144))
    patch = int(vcfg.get("patch_size", 14))
    img = int(vcfg.get("image_size", 224))
    n_pos = (img // patch) ** 2 + 1

    def g(s: str, what: str) -> TensorRef:
        return require(ckpt, p + s, what)

    pe = g("embeddings.patch_embedding.weight", "patch embedding")
    expect_shape(pe, (h, 3, patch, patch), "patch embedding")
    jobs = [
        _flat_job("v.class_embd", g("embeddings.class_embedding", "class embedding"), (h,)),
        job("v.patch_embd.weight", pe),
    ]
    if p + "embeddings.patch_embedding.bias" in ckpt:
        jobs.append(job("v.patch_embd.bias", ckpt[p + "embeddings.patch_embedding.bias"]))
    pos = g("embeddings.position_embedding", "position embedding")
    jobs.append(_flat_job("v.position_embd.weight", pos, (n_pos, h)))
    for i in range(n_layer):
        b = f"encoder.layers.{i}."
        t = f"v.blk.{i}."
        qkv = g(b + "self_attn.qkv.weight", f"vision layer {i} qkv")
        expect_shape(qkv, (3 * h, h), f"vision layer {i} qkv")
        for k, part in (("q", 0), ("k", 1), ("v", 2)):
            jobs.append(_named(_rows(qkv, part, h), f"{t}attn_{k}.weight"))
        if p + b + "self_attn.qkv.bias" in ckpt:  # transformers: cat(q_bias, 0, v_bias)
            fused = ckpt[p + b + "self_attn.qkv.bias"]
            expect_shape(fused, (3 * h,), f"vision layer {i} qkv bias")
            jobs.append(_named(_rows(fused, 0, h), f"{t}attn_q.bias"))
            jobs.append(_named(_rows(fused, 2, h), f"{t}attn_v.bias"))
        else:  # older transformers / LAVIS: separate q_bias and v_bias
            for k in ("q", "v"):
                ref = g(b + f"self_attn.{k}_bias", f"vision layer {i} {k} bias")
                expect_shape(ref, (h,), f"vision layer {i} {k} bias")
                jobs.append(job(f"{t}attn_{k}.bias", ref))
        for hf, gg, shape in (
            ("self_attn.projection", "attn_out", (h, h)),
            ("mlp.fc1", "ffn_up", (ff, h)),
            ("mlp.fc2", "ffn_down", (h, ff)),
        ):
            w = g(b + hf + ".weight", f"vision layer {i} {hf}")
            expect_shape(w, shape, f"vision layer {i} {hf}")
            jobs.append(job(f"{t}{gg}.weight", w))
            jobs.append(job(f"{t}{gg}.bias", g(b + hf + ".bias", f"vision layer {i} {hf}")))
        for hf, gg in (("layer_norm1", "ln1"), ("layer_norm2", "ln2")):
            for kind in ("weight", "bias"):
                jobs.append(job(f"{t}{gg}.{kind}", g(f"{b}{hf}.{kind}", f"vision layer {i} norm")))
    for kind in ("weight", "bias"):  # ln_vision
        jobs.append(job(f"v.post_ln.{kind}", g(f"post_layernorm.{kind}", "ln_vision")))
    hp = {
        "image_size": img,
        "patch_size": patch,
        "n_embd": h,
        "n_ff": ff,
        "n_layer": n_layer,
        "n_head": int(vcfg.get("num_attention_heads", 16)),
        "eps": float(vcfg.get("layer_norm_eps", 1e-6)),
    }
    return hp, jobs


def qformer_jobs(
    ckpt: Checkpoint, qcfg: dict[str, Any], *, text_input: bool, vision_width: int
) -> tuple[dict[str, Any], list[TensorJob]]:
    """The Q-Former (``query_tokens``, ``qformer.*``) under ``qf.*``."""
    p = "qformer."
    n_layer = count_layers(ckpt.names(), re.escape(p) + r"encoder\.layer\.(\d+)\.")
    if n_layer == 0:
        raise UserError("The checkpoint has no Q-Former (qformer.encoder.layer.N)")
    d = int(qcfg.get("hidden_size", 768))
    ff = int(qcfg.get("intermediate_size", 3072))
    freq = int(qcfg.get("cross_attention_frequency", 2))
    if int(qcfg.get("encoder_hidden_size", vision_width)) != vision_width:
        raise UserError(
            f"The Q-Former reads {qcfg.get('encoder_hidden_size')}-wide image features but the "
            f"vision encoder is {vision_width} wide"
        )
    if str(qcfg.get("hidden_act", "gelu")) != "gelu":
        raise UserError(f"Q-Former activation {qcfg.get('hidden_act')!r} is not supported (gelu)")
    qt = require(ckpt, "query_tokens", "learned queries")
    shape = _squeeze(tuple(qt.shape))
    if len(shape) != 2 or shape[1] != d:
        raise CorruptFileError(f"query_tokens has shape {list(qt.shape)}, expected [1, N, {d}]")
    n_query = shape[0]
    jobs = [_flat_job("qf.query_embd", qt, (n_query, d))]

    def g(s: str, what: str) -> TensorRef:
        return require(ckpt, p + s, what)

    def lin(src: str, dst: str, shape: tuple[int, int], what: str) -> None:
        w = g(src + ".weight", what)
        expect_shape(w, shape, what)
        jobs.append(job(dst + ".weight", w))
        jobs.append(job(dst + ".bias", g(src + ".bias", what)))

    def norm(src: str, dst: str, what: str) -> None:
        for kind in ("weight", "bias"):
            jobs.append(job(f"{dst}.{kind}", g(f"{src}.{kind}", what)))

    if text_input:
        norm("embeddings.layernorm", "qf.embd_ln", "Q-Former embedding norm")
        tok = g("embeddings.word_embeddings.weight", "Q-Former word embeddings")
        pos = g("embeddings.position_embeddings.weight", "Q-Former position embeddings")
        if len(tok.shape) != 2 or tok.shape[1] != d or len(pos.shape) != 2 or pos.shape[1] != d:
            raise CorruptFileError("The Q-Former's word/position embeddings have the wrong width")
        jobs.append(job("qf.token_embd.weight", tok))
        jobs.append(job("qf.position_embd.weight", pos))
        text_positions = int(pos.shape[0])
    else:
        norm("layernorm", "qf.embd_ln", "Q-Former input norm")
        text_positions = 0
    for i in range(n_layer):
        b = f"encoder.layer.{i}."
        t = f"qf.blk.{i}."
        for k, name in (("query", "attn_q"), ("key", "attn_k"), ("value", "attn_v")):
            lin(f"{b}attention.attention.{k}", t + name, (d, d), f"Q-Former layer {i} {k}")
        lin(f"{b}attention.output.dense", t + "attn_out", (d, d), f"Q-Former layer {i} output")
        norm(f"{b}attention.output.LayerNorm", t + "attn_ln", f"Q-Former layer {i}")
        if i % freq == 0:
            lin(f"{b}crossattention.attention.query", t + "cross_q", (d, d), "cross-attention")
            for k in ("key", "value"):
                lin(
                    f"{b}crossattention.attention.{k}",
                    t + f"cross_{k[0]}",
                    (d, vision_width),
                    f"Q-Former layer {i} cross-attention {k}",
                )
            lin(f"{b}crossattention.output.dense", t + "cross_out", (d, d), "cross-attention")
            norm(f"{b}crossattention.output.LayerNorm", t + "cross_ln", "cross-attention")
        elif p + b + "crossattention.attention.query.weight" in ckpt:
            raise CorruptFileError(
                f"Q-Former layer {i} has cross-attention, which cross_attention_frequency "
                f"{freq} does not expect"
            )
        lin(f"{b}intermediate_query.dense", t + "ffn_up", (ff, d), "Q-Former query FFN")
        lin(f"{b}output_query.dense", t + "ffn_down", (d, ff), "Q-Former query FFN")
        norm(f"{b}output_query.LayerNorm", t + "ffn_ln", "Q-Former query FFN")
        if text_input:
            lin(f"{b}intermediate.dense", t + "txt_ffn_up", (ff, d), "Q-Former text FFN")
            lin(f"{b}output.dense", t + "txt_ffn_down", (d, ff), "Q-Former text FFN")
            norm(f"{b}output.LayerNorm", t + "txt_ffn_ln", "Q-Former text FFN")
    hp = {
        "qf_n_embd": d,
        "qf_n_ff": ff,
        "qf_n_layer": n_layer,
        "qf_n_head": int(qcfg.get("num_attention_heads", 12)),
        "qf_eps": float(qcfg.get("layer_norm_eps", 1e-12)),
        "cross_attention_frequency": freq,
        "n_query": n_query,
        "text_positions": text_positions,
    }
    return hp, jobs


class _QformerFamily:
    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    model_types: ClassVar[tuple[str, ...]]
    text_input: ClassVar[bool]
    template: ClassVar[str]
    t5_template: ClassVar[str]

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        archs = config.get("architectures") or []
        if any(a in cls.architectures for a in archs):
            return True
        return not archs and config.get("model_type") in cls.model_types

    def plan(
        self, folder: Path, config: dict[str, Any], *, vision_tower: Path | None
    ) -> FamilyPlan:
        if vision_tower is not None:
            raise UserError(f"--vision-tower does not apply to {self.name}: it has its own encoder")
        tcfg = dict(config.get("text_config") or {})
        text_type = str(tcfg.get("model_type", "opt"))
        if text_type == "opt":
            raise UserError(
                f"{self.name} with an OPT language model cannot run on llama.cpp (it has no OPT "
                "architecture); run it with vLLM or transformers instead"
            )
        if text_type == "t5":
            return self._plan_t5(folder, config, tcfg)
        if text_type not in ("llama", "mistral"):
            raise UserError(
                f"{self.name} with a {text_type!r} language model is not supported (llama is)"
            )
        ckpt = open_checkpoint(folder)
        text_hp, text_jobs = llama_text_plan(
            ckpt,
            tcfg,
            layer_prefix="language_model.model.layers.",
            embed="language_model.model.embed_tokens.weight",
            norm="language_model.model.norm.weight",
            lm_head="language_model.lm_head.weight",
            mistral=text_type == "mistral",
        )
        return qformer_plan(
            ckpt,
            vcfg=dict(config.get("vision_config") or {}),
            qcfg=dict(config.get("qformer_config") or {}),
            text=(text_hp, text_jobs),
            tokenizer=self._qformer_tokenizer(folder),
            family=self.name,
            architecture=self.architectures[0],
            template=self.template,
            folders=[folder],
            tokenizer_dir=folder,
            config_ids={
                "bos_token_id": tcfg.get("bos_token_id"),
                "eos_token_id": tcfg.get("eos_token_id"),
                "pad_token_id": tcfg.get("pad_token_id", config.get("pad_token_id")),
            },
        )

    def _qformer_tokenizer(self, folder: Path) -> WordPiece | None:
        if not self.text_input:
            return None
        qdir = folder / "qformer_tokenizer"
        if not qdir.is_dir():
            raise UserError(
                f"{folder} has no qformer_tokenizer/ folder: InstructBLIP's Q-Former reads "
                "the instruction with its own (bert-base-uncased) tokenizer"
            )
        return read_wordpiece_folder(qdir)

    def _plan_t5(self, folder: Path, config: dict[str, Any], tcfg: dict[str, Any]) -> FamilyPlan:
        """A Flan-T5 language model: llama.cpp's ``t5`` text GGUF (t5_text.py)."""
        ckpt = open_checkpoint(folder)
        notes: list[str] = []
        text_hp, text_jobs, text_kv = t5_text_plan(
            ckpt, tcfg, prefix="language_model.", notes=notes
        )
        config_ids = {
            "eos_token_id": tcfg.get("eos_token_id"),
            "pad_token_id": tcfg.get("pad_token_id", config.get("pad_token_id")),
        }
        template = self.t5_template
        vocab, space_prefix, vocab_kv = t5_vocab(
            folder, vocab_size=text_hp.n_vocab, config_ids=config_ids, template=template
        )
        text_hp.add_space_prefix = space_prefix
        plan = qformer_plan(
            ckpt,
            vcfg=dict(config.get("vision_config") or {}),
            qcfg=dict(config.get("qformer_config") or {}),
            text=(text_hp, text_jobs),
            tokenizer=self._qformer_tokenizer(folder),
            family=self.name,
            architecture=self.architectures[0],
            template=template,
            folders=[folder],
            tokenizer_dir=folder,
            config_ids=config_ids,
        )
        plan.vocab = vocab
        plan.text_kv = text_kv + vocab_kv
        plan.notes = notes + plan.notes
        return plan


def qformer_plan(
    ckpt: Checkpoint,
    *,
    vcfg: dict[str, Any],
    qcfg: dict[str, Any],
    text: tuple[TextHParams, list[TensorJob]],
    tokenizer: WordPiece | None,
    family: str,
    architecture: str,
    template: str,
    folders: list[Path],
    tokenizer_dir: Path,
    config_ids: dict[str, int | None],
    ln_vision_eps: float | None = None,
    vision_source: str = "checkpoint",
) -> FamilyPlan:
    """Both files' plan from a checkpoint in transformers' names (``vision_model.*``,
    ``query_tokens``, ``qformer.*``, ``language_projection.*``): the Hugging Face layout
    directly, the LAVIS / MiniGPT-4 layouts through a renamed view."""
    text_hp, text_jobs = text
    notes: list[str] = []
    vhp, vis_jobs = eva_vision_jobs(ckpt, vcfg)
    qhp, q_jobs = qformer_jobs(
        ckpt, qcfg, text_input=tokenizer is not None, vision_width=vhp["n_embd"]
    )
    proj = require(ckpt, "language_projection.weight", "language projection")
    if len(proj.shape) != 2 or proj.shape[1] != qhp["qf_n_embd"]:
        raise CorruptFileError(f"language_projection.weight has shape {list(proj.shape)}")
    if proj.shape[0] != text_hp.n_embd:
        raise UserError(
            f"The language projection outputs width {proj.shape[0]} but the language "
            f"model's hidden size is {text_hp.n_embd}; they do not belong together"
        )
    q_jobs.append(job("mm.proj.weight", proj))
    q_jobs.append(job("mm.proj.bias", require(ckpt, "language_projection.bias", "bias")))
    if tokenizer is not None:
        n_rows = int(ckpt["qformer.embeddings.word_embeddings.weight"].shape[0])
        if len(tokenizer.tokens) > n_rows:
            raise UserError(
                f"The Q-Former tokenizer has {len(tokenizer.tokens)} tokens but the "
                f"Q-Former's embedding table only {n_rows} rows"
            )
    mean, std = image_norm_from(folders, notes)
    vision = QformerVision(
        ln_vision_eps=vhp["eps"] if ln_vision_eps is None else ln_vision_eps,
        image_mean=mean,
        image_std=std,
        projection_dim=text_hp.n_embd,
        family=family,
        tokenizer=tokenizer,
        **vhp,
        **qhp,
    )
    return FamilyPlan(
        family=family,
        architecture=architecture,
        text=text_hp,
        text_tensors=text_jobs,
        vision=vision,
        vision_tensors=vis_jobs + q_jobs,
        tokenizer_dir=tokenizer_dir,
        default_template=template,
        config_ids=config_ids,
        notes=notes,
        vision_source=vision_source,
        # the text after the rows is tokenized on its own: BOS, then "▁Question"
        legacy_spaces=True,
        add_bos=False,
    )


class Blip2(_QformerFamily):
    name: ClassVar[str] = "blip2"
    architectures: ClassVar[tuple[str, ...]] = ("Blip2ForConditionalGeneration",)
    model_types: ClassVar[tuple[str, ...]] = ("blip-2",)
    text_input: ClassVar[bool] = False
    template: ClassVar[str] = BLIP2_TEMPLATE
    t5_template: ClassVar[str] = BLIP2_T5_TEMPLATE


class InstructBlip(_QformerFamily):
    name: ClassVar[str] = "instructblip"
    architectures: ClassVar[tuple[str, ...]] = ("InstructBlipForConditionalGeneration",)
    model_types: ClassVar[tuple[str, ...]] = ("instructblip",)
    text_input: ClassVar[bool] = True
    template: ClassVar[str] = INSTRUCTBLIP_TEMPLATE
    t5_template: ClassVar[str] = INSTRUCTBLIP_T5_TEMPLATE


FAMILIES = (Blip2, InstructBlip)
