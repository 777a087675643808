"""OpenFlamingo v2 (mlfoundations/open_flamingo): a base LLM with open_flamingo's gated
cross-attention blocks, an OpenCLIP ViT and a Perceiver resampler. Layout:
docs/openflamingo-gguf.md.

A release (``openflamingo/OpenFlamingo-4B-vitl-rpj3b``) is ``checkpoint.pt`` only: the trained
tensors (``perceiver.*``, the gated blocks as ``lang_encoder.<layers>.N.gated_cross_attn_layer.*``
and the resized input/output embeddings). The rest comes from where the user has it:

- the base LLM (a Hugging Face folder: RedPajama-INCITE-3B, GPT-NeoX): a sub-folder of the
  model folder, or ``--llm``; any ``lang_encoder.*`` tensor in ``checkpoint.pt`` replaces the
  base's;
- the OpenCLIP ViT-L/14 (openai) tower: ``--vision-tower`` or inside the folder (see
  ``openflamingo_parts``).

Facts from open_flamingo 2.0.1 kept here: a block runs before decoder layer ``i`` when
``(i + 1) % cross_attn_every_n_layers == 0``; blocks and Perceiver use 8 heads of 64;
the tokenizer gains ``<|endofchunk|>`` and ``<image>`` (and ``<PAD>`` when it has no pad
token), in that order, and the embeddings are resized to the new length; generation stops at
``<|endofchunk|>``. Bases: GPT-NeoX and MPT (``openflamingo_lm``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import TensorRef, open_checkpoint
from ..tokenizer import CONTROL
from .base import FamilyPlan, TensorJob, expect_shape, job, read_json, read_json_opt
from .clip import VisionHParams, tower_kv
from .openflamingo_lm import BASES, LAYERS, base_plan, fit_vocab
from .openflamingo_parts import find_tower, split_rows, tower_plan
from .original_files import OriginalFiles, torch_refs
from .qwen2_text import load_bpe_vocab

PROJECTOR = "openflamingo"
CHECKPOINT = "checkpoint.pt"
EOC = "<|endofchunk|>"
IMAGE = "<image>"
PAD = "<PAD>"
HEAD_DIM = 64  # open_flamingo's dim_head (Perceiver and gated blocks)

# Plain completion, as OpenFlamingo was trained (no chat format): a user turn is its images'
# <image> markers then its text, an assistant turn its text (after a space unless it starts
# with one) closed by <|endofchunk|>
# ("<image>An image of two cats.<|endofchunk|><image>An image of").
TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- set n_images = 0 -%}{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') "
    "| list | length -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- if text and text[0] not in ' \\n' -%}{{ ' ' }}{%- endif -%}"
    "{{ text + '<|endofchunk|>' }}"
    "{%- elif message['role'] == 'user' -%}{{ '<image>' * n_images + text }}"
    "{%- else -%}{{ text + '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass
class OpenFlamingoVision:
    vit: VisionHParams
    n_latents: int
    depth: int
    n_head: int
    image_token_id: int
    eoc_token_id: int
    every_n: int
    projector_type: str = PROJECTOR

    @property
    def n_image_tokens(self) -> int:
        return self.n_latents

    def description(self, name: str) -> str:
        return f"OpenCLIP ViT + Perceiver resampler of {name} (OpenFlamingo, converted by mmchat)"

    def kv(self) -> list[tuple[str, Any]]:
        return [
            *tower_kv(self.vit, self.projector_type),
            ("mmchat.vision.family", "openflamingo"),
            ("openflamingo.perceiver.n_latents", self.n_latents),
            ("openflamingo.perceiver.block_count", self.depth),
            ("openflamingo.perceiver.head_count", self.n_head),
            ("openflamingo.perceiver.head_dim", HEAD_DIM),
            ("openflamingo.image_token_id", self.image_token_id),
            ("openflamingo.eoc_token_id", self.eoc_token_id),
            ("openflamingo.cross_attn_every_n_layers", self.every_n),
            # <|endofchunk|> does not end an image's reach (IDEFICS's end-of-sequence rule)
            ("openflamingo.eos_ends_image", False),
        ]


def _lang_name(name: str) -> tuple[str, int, str] | None:
    """A ``checkpoint.pt`` name -> ("base", -1, HF name) or ("xattn", layer, rest)."""
    if not name.startswith("lang_encoder."):
        return None
    rest = name[len("lang_encoder.") :]
    layers = "|".join(re.escape(v) for v in LAYERS.values())
    m = re.fullmatch(rf"(?:{layers})\.(\d+)\.gated_cross_attn_layer\.(.+)", rest)
    m = m or re.fullmatch(r"gated_cross_attn_layers\.(\d+)\.(.+)", rest)
    if m:
        return "xattn", int(m.group(1)), m.group(2)
    m = re.fullmatch(rf"({layers})\.(\d+)\.decoder_layer\.(.+)", rest)
    if m:  # a full save: the FlamingoLayer's wrapped decoder layer
        return "base", -1, f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
    if rest.startswith("old_decoder_blocks."):
        return None  # the same tensors again, under the layers' names
    return "base", -1, rest


def _base_folder(files: OriginalFiles, folder: Path) -> Path:
    given = files.overrides.get("llm")
    if given is not None:
        return given
    found = [
        sub
        for sub in sorted(p for p in folder.iterdir() if p.is_dir())
        if read_json_opt(sub / "config.json").get("model_type") in (*BASES, "mosaic_gpt")
    ]
    if len(found) != 1:
        what = "none" if not found else ", ".join(p.name for p in found)
        raise UserError(
            f"{folder} must hold exactly one base language model folder (Hugging Face, e.g. "
            f"RedPajama-INCITE-Base-3B-v1), or name it with --llm; found {what}"
        )
    return found[0]


def _tokens(llm: Path) -> tuple[dict[str, int], int, bool]:
    """The base tokenizer's token ids by text, its length, and whether it has a pad token."""
    tj = read_json_opt(llm / "tokenizer.json")
    ids: dict[str, int] = {}
    vocab = (tj.get("model") or {}).get("vocab") or read_json_opt(llm / "vocab.json")
    if not isinstance(vocab, dict) or not vocab:
        raise UserError(f"No byte-level BPE tokenizer (tokenizer.json) in {llm}")
    ids.update({str(k): int(v) for k, v in vocab.items()})
    for entry in tj.get("added_tokens") or []:
        if isinstance(entry, dict) and isinstance(entry.get("id"), int):
            ids[str(entry.get("content"))] = int(entry["id"])
    tcfg = read_json_opt(llm / "tokenizer_config.json")
    for key, entry in (tcfg.get("added_tokens_decoder") or {}).items():
        if str(key).isdigit() and isinstance(entry, dict):
            ids[str(entry.get("content"))] = int(key)
    pad = tcfg.get("pad_token")
    return ids, max(ids.values()) + 1, pad is not None


class OpenFlamingo:
    name: ClassVar[str] = "openflamingo"
    architectures: ClassVar[tuple[str, ...]] = ("OpenFlamingo",)
    parts: ClassVar[tuple[str, ...]] = ("llm",)

    def __init__(self, files: OriginalFiles) -> None:
        self.files = files

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        return False  # a release has no config.json: see detect_folder

    @classmethod
    def detect_folder(cls, files: OriginalFiles) -> bool:
        return (files.folder / CHECKPOINT).is_file()

    def plan(
        self, folder: Path, config: dict[str, Any], *, vision_tower: Path | None
    ) -> FamilyPlan:
        self.files.refuse_unused(self.parts, "OpenFlamingo")
        llm = _base_folder(self.files, folder)
        lcfg = read_json(llm / "config.json")
        if lcfg.get("model_type") not in BASES:
            base_plan({}, lcfg, llm)  # the clear error for another base
        trained = torch_refs(folder / CHECKPOINT)
        base: dict[str, TensorRef] = dict(open_checkpoint(llm).refs)
        xattn: dict[int, dict[str, TensorRef]] = {}
        perceiver: dict[str, TensorRef] = {}
        for name, ref in trained.items():
            name = name.removeprefix("module.")  # a DistributedDataParallel save
            if name.startswith("perceiver."):
                perceiver[name[len("perceiver.") :]] = ref
                continue
            got = _lang_name(name)
            if got is None:
                continue
            kind, layer, rest = got
            if kind == "xattn":
                xattn.setdefault(layer, {})[rest] = ref
            else:
                base[rest] = ref
        if not xattn or not perceiver:
            raise CorruptFileError(
                f"{folder / CHECKPOINT} has no gated cross-attention blocks or no Perceiver: it "
                "is not an OpenFlamingo checkpoint"
            )
        notes: list[str] = []
        lm = base_plan(base, lcfg, llm)
        text_hp, text_jobs = lm.hp, lm.jobs
        ids, n_tok, has_pad = _tokens(llm)
        extra = [EOC, IMAGE] + ([] if has_pad else [PAD])
        for t in extra:
            if t not in ids:
                ids[t] = n_tok
                n_tok += 1
        fit_vocab(lm, base, n_tok)
        every_n = min(xattn) + 1
        want = {i for i in range(text_hp.n_layer) if (i + 1) % every_n == 0}
        if set(xattn) != want:
            raise CorruptFileError(
                f"gated blocks sit before layers {sorted(xattn)[:6]}…, not every "
                f"{every_n}th of {text_hp.n_layer} layers as OpenFlamingo places them"
            )
        tower = find_tower(folder, vision_tower)
        vit, vis_jobs, source = tower_plan(tower, notes)
        x_jobs, x_heads = _xattn_jobs(xattn, text_hp.n_embd, vit.n_embd)
        text_jobs += x_jobs
        text_kv: list[tuple[str, Any]] = [
            *lm.kv,
            ("openflamingo.cross_attention.head_count", x_heads),
            ("openflamingo.cross_attention.head_dim", HEAD_DIM),
            ("openflamingo.cross_attn_every_n_layers", every_n),
        ]
        n_lat, depth, p_heads, p_jobs = _perceiver_jobs(perceiver, vit.n_embd)
        vis_jobs += p_jobs
        vocab = load_bpe_vocab(llm, vocab_size=n_tok, config=lcfg, default_template=TEMPLATE)
        vocab.pre = "gpt-2"
        for t in extra:
            vocab.tokens[ids[t]] = t
            vocab.types[ids[t]] = CONTROL
        vocab.eos_id = ids[EOC]  # open_flamingo's generate() stops at <|endofchunk|>
        vocab.pad_id = ids.get(PAD, vocab.pad_id)
        vocab.chat_template, vocab.template_source = TEMPLATE, "family default"
        vocab.add_bos = False
        vision = OpenFlamingoVision(
            vit=vit,
            n_latents=n_lat,
            depth=depth,
            n_head=p_heads,
            image_token_id=ids[IMAGE],
            eoc_token_id=ids[EOC],
            every_n=every_n,
        )
        return FamilyPlan(
            family=self.name,
            architecture=self.architectures[0],
            text=text_hp,
            text_tensors=text_jobs,
            vision=vision,
            vision_tensors=vis_jobs,
            tokenizer_dir=llm,
            default_template=TEMPLATE,
            config_ids={},
            notes=notes,
            vision_source=source,
            legacy_spaces=False,
            vocab=vocab,
            text_kv=text_kv,
        )


def _need(refs: dict[str, TensorRef], name: str, what: str) -> TensorRef:
    if name not in refs:
        raise CorruptFileError(f"The checkpoint has no tensor {name!r} ({what})")
    return refs[name]


def _xattn_jobs(
    blocks: dict[int, dict[str, TensorRef]], n_embd: int, vis: int
) -> tuple[list[TensorJob], int]:
    jobs: list[TensorJob] = []
    heads = 0
    for layer in sorted(blocks):
        t, b = blocks[layer], f"blk.{layer}."
        what = f"gated block before layer {layer}"
        q = _need(t, "attn.to_q.weight", what)
        inner = int(q.shape[0])
        if inner % HEAD_DIM:
            raise CorruptFileError(f"{what}: to_q has {inner} rows, not heads of {HEAD_DIM}")
        heads = inner // HEAD_DIM
        expect_shape(q, (inner, n_embd), what + " to_q")
        kv = _need(t, "attn.to_kv.weight", what)
        expect_shape(kv, (2 * inner, vis), what + " to_kv")
        k, v = split_rows(kv, 2)
        o = _need(t, "attn.to_out.weight", what)
        expect_shape(o, (n_embd, inner), what + " to_out")
        jobs += [
            job(b + "xattn_q.weight", q),
            job(b + "xattn_k.weight", k),
            job(b + "xattn_v.weight", v),
        ]
        jobs.append(job(b + "xattn_out.weight", o))
        for hf, gg in (("attn.norm", "xattn_norm"), ("ff.0", "xffn_norm")):
            for kind in ("weight", "bias"):
                ref = _need(t, f"{hf}.{kind}", what)
                expect_shape(ref, (n_embd,), f"{what} {hf}")
                jobs.append(job(f"{b}{gg}.{kind}", ref))
        up, down = _need(t, "ff.1.weight", what), _need(t, "ff.3.weight", what)
        if len(up.shape) != 2 or up.shape[1] != n_embd:
            raise CorruptFileError(f"{what}: ff.1 has shape {list(up.shape)}")
        expect_shape(down, (n_embd, up.shape[0]), what + " ff.3")
        jobs += [job(b + "xffn_up.weight", up), job(b + "xffn_down.weight", down)]
        for hf, gg in (("attn_gate", "xattn_alpha"), ("ff_gate", "xffn_alpha")):
            ref = _need(t, hf, what)
            expect_shape(ref, (1,), f"{what} {hf}")
            jobs.append(job(b + gg, ref))
    return jobs, heads


def _perceiver_jobs(t: dict[str, TensorRef], width: int) -> tuple[int, int, int, list[TensorJob]]:
    for unused in ("media_time_embs", "frame_embs"):
        if unused in t:
            raise UserError(
                f"this checkpoint's Perceiver has {unused}; the released OpenFlamingo models "
                "have none and mmchat does not apply them"
            )
    lat = _need(t, "latents", "Perceiver latents")
    if len(lat.shape) != 2 or lat.shape[1] != width:
        raise CorruptFileError(
            f"perceiver.latents has shape {list(lat.shape)}, width {width} expected"
        )
    depth = len({int(m.group(1)) for n in t if (m := re.match(r"layers\.(\d+)\.", n))})
    if depth == 0:
        raise CorruptFileError("checkpoint.pt has no Perceiver layers")
    jobs = [job("perc.latents", lat)]
    heads = 0
    for i in range(depth):
        a, f, b = f"layers.{i}.0.", f"layers.{i}.1.", f"perc.blk.{i}."
        what = f"Perceiver layer {i}"
        for hf, gg in (("norm_media", "ctx_norm"), ("norm_latents", "lat_norm")):
            for kind in ("weight", "bias"):
                ref = _need(t, f"{a}{hf}.{kind}", what)
                expect_shape(ref, (width,), what)
                jobs.append(job(f"{b}{gg}.{kind}", ref))
        q = _need(t, a + "to_q.weight", what)
        inner = int(q.shape[0])
        if inner % HEAD_DIM:
            raise CorruptFileError(f"{what}: to_q has {inner} rows, not heads of {HEAD_DIM}")
        heads = inner // HEAD_DIM
        expect_shape(q, (inner, width), what + " to_q")
        kv = _need(t, a + "to_kv.weight", what)
        expect_shape(kv, (2 * inner, width), what + " to_kv")
        k, v = split_rows(kv, 2)
        o = _need(t, a + "to_out.weight", what)
        expect_shape(o, (width, inner), what + " to_out")
        jobs += [
            job(b + "attn_q.weight", q),
            job(b + "attn_k.weight", k),
            job(b + "attn_v.weight", v),
        ]
        jobs.append(job(b + "attn_out.weight", o))
        for kind in ("weight", "bias"):
            ref = _need(t, f"{f}0.{kind}", what)
            expect_shape(ref, (width,), what + " MLP norm")
            jobs.append(job(f"{b}ffn_norm.{kind}", ref))
        up, down = _need(t, f + "1.weight", what), _need(t, f + "3.weight", what)
        expect_shape(up, (4 * width, width), what + " MLP 1")
        expect_shape(down, (width, 4 * width), what + " MLP 3")
        jobs += [job(b + "ffn_up.weight", up), job(b + "ffn_down.weight", down)]
    for kind in ("weight", "bias"):
        ref = _need(t, f"norm.{kind}", "Perceiver final norm")
        expect_shape(ref, (width,), "Perceiver final norm")
        jobs.append(job(f"perc.post_norm.{kind}", ref))
    return int(lat.shape[0]), depth, heads, jobs


FOLDER_FAMILIES: tuple[type[OpenFlamingo], ...] = (OpenFlamingo,)
