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
``<|endofchunk|>``. Only the GPT-NeoX base is converted (MPT: not yet).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import TensorRef, open_checkpoint
from ..tokenizer import CONTROL
from .base import FamilyPlan, TensorJob, TextHParams, expect_shape, job, read_json, read_json_opt
from .clip import VisionHParams
from .openflamingo_parts import find_tower, rows_of, split_rows, tower_plan
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
        v = self.vit
        return [
            ("clip.has_text_encoder", False),
            ("clip.has_vision_encoder", True),
            ("clip.projector_type", self.projector_type),
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
    m = re.fullmatch(
        r"gpt_neox\.layers\.(\d+)\.gated_cross_attn_layer\.(.+)", rest
    ) or re.fullmatch(r"gated_cross_attn_layers\.(\d+)\.(.+)", rest)
    if m:
        return "xattn", int(m.group(1)), m.group(2)
    m = re.fullmatch(
        r"(?:gpt_neox\.layers|old_decoder_blocks)\.(\d+)\.(?:decoder_layer\.)?(.+)", rest
    )
    if m:
        return "base", -1, f"gpt_neox.layers.{m.group(1)}.{m.group(2)}"
    return "base", -1, rest


def _gpt_neox_folder(files: OriginalFiles, folder: Path) -> Path:
    given = files.overrides.get("llm")
    if given is not None:
        return given
    found = [
        sub
        for sub in sorted(p for p in folder.iterdir() if p.is_dir())
        if read_json_opt(sub / "config.json").get("model_type") in ("gpt_neox", "mpt", "mosaic_gpt")
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
        llm = _gpt_neox_folder(self.files, folder)
        lcfg = read_json(llm / "config.json")
        if lcfg.get("model_type") != "gpt_neox":
            raise UserError(
                f"OpenFlamingo on a {lcfg.get('model_type')!r} base ({llm.name}) is not supported "
                "yet: mmchat converts the GPT-NeoX (RedPajama-INCITE) models"
            )
        trained = torch_refs(folder / CHECKPOINT)
        base: dict[str, TensorRef] = dict(open_checkpoint(llm).refs)
        xattn: dict[int, dict[str, TensorRef]] = {}
        perceiver: dict[str, TensorRef] = {}
        for name, ref in trained.items():
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
        text_hp, text_jobs = _neox_plan(base, lcfg, llm)
        ids, n_tok, has_pad = _tokens(llm)
        extra = [EOC, IMAGE] + ([] if has_pad else [PAD])
        for t in extra:
            if t not in ids:
                ids[t] = n_tok
                n_tok += 1
        text_hp.n_vocab = n_tok
        _fit_vocab(text_jobs, base, n_tok, text_hp.n_embd)
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
            ("gptneox.use_parallel_residual", bool(lcfg.get("use_parallel_residual", True))),
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


def _neox_plan(
    base: dict[str, TensorRef], cfg: dict[str, Any], llm: Path
) -> tuple[TextHParams, list[TensorJob]]:
    """GPT-NeoX in llama.cpp's gptneox names, the fused QKV split into Q, K, V."""
    try:
        E = int(cfg["hidden_size"])
        L = int(cfg["num_hidden_layers"])
        H = int(cfg["num_attention_heads"])
        F = int(cfg.get("intermediate_size") or 4 * E)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"{llm / 'config.json'} lacks {exc}") from None
    act = str(cfg.get("hidden_act", "gelu"))
    if act != "gelu":
        raise UserError(f"GPT-NeoX with hidden_act {act!r} is not supported (gelu is)")
    if E % H:
        raise CorruptFileError(f"hidden_size {E} is not a multiple of {H} heads")
    D = E // H
    # transformers < 5 writes rotary_pct / rotary_emb_base, 5.x rope_parameters
    rope = cfg.get("rope_parameters") or {}
    rope = rope if isinstance(rope, dict) else {}
    pct = float(cfg.get("rotary_pct") or rope.get("partial_rotary_factor") or 1.0)
    theta = float(cfg.get("rotary_emb_base") or rope.get("rope_theta") or 10000.0)
    jobs: list[TensorJob] = []

    def put(gg: str, hf: str, shape: tuple[int, ...]) -> None:
        ref = _need(base, hf, "GPT-NeoX")
        expect_shape(ref, shape, gg)
        jobs.append(job(gg, ref))

    put(
        "token_embd.weight",
        "gpt_neox.embed_in.weight",
        tuple(base["gpt_neox.embed_in.weight"].shape),
    )
    put("output_norm.weight", "gpt_neox.final_layer_norm.weight", (E,))
    put("output_norm.bias", "gpt_neox.final_layer_norm.bias", (E,))
    out = "embed_out.weight"
    if out not in base:
        raise UserError("GPT-NeoX with tied input/output embeddings is not supported")
    put("output.weight", out, tuple(base[out].shape))
    for i in range(L):
        p, b = f"gpt_neox.layers.{i}.", f"blk.{i}."
        for hf, gg in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            put(b + gg + ".weight", p + hf + ".weight", (E,))
            put(b + gg + ".bias", p + hf + ".bias", (E,))
        for kind, shape in (("weight", (3 * E, E)), ("bias", (3 * E,))):
            ref = _need(base, p + "attention.query_key_value." + kind, f"layer {i} QKV")
            expect_shape(ref, shape, f"layer {i} QKV")
            # rows are [head][q|k|v][head_dim]: take each third per head
            for j, gg in enumerate(("attn_q", "attn_k", "attn_v")):
                jobs.append(_qkv_part(ref, j, H, D, b + gg + "." + kind))
        put(b + "attn_output.weight", p + "attention.dense.weight", (E, E))
        put(b + "attn_output.bias", p + "attention.dense.bias", (E,))
        put(b + "ffn_up.weight", p + "mlp.dense_h_to_4h.weight", (F, E))
        put(b + "ffn_up.bias", p + "mlp.dense_h_to_4h.bias", (F,))
        put(b + "ffn_down.weight", p + "mlp.dense_4h_to_h.weight", (E, F))
        put(b + "ffn_down.bias", p + "mlp.dense_4h_to_h.bias", (E,))
    hp = TextHParams(
        n_vocab=int(base["gpt_neox.embed_in.weight"].shape[0]),
        n_embd=E,
        n_ff=F,
        n_layer=L,
        n_head=H,
        n_head_kv=H,
        head_dim=D,
        n_ctx=int(cfg.get("max_position_embeddings", 2048)),
        rms_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        rope_theta=theta,
        gguf_arch="gptneox",
        rope_dim=int(D * pct),
    )
    return hp, jobs


def _qkv_part(ref: TensorRef, j: int, n_head: int, head_dim: int, name: str) -> TensorJob:
    def load() -> Any:
        arr = ref.load().astype("float32")
        arr = arr.reshape(n_head, 3, head_dim, *arr.shape[1:])[:, j]
        return arr.reshape(n_head * head_dim, *arr.shape[2:]).copy()

    shape = (n_head * head_dim, *ref.shape[1:])
    return TensorJob(name, shape, ref.nbytes // 3, load)


def _fit_vocab(
    jobs: list[TensorJob], base: dict[str, TensorRef], n_vocab: int, n_embd: int
) -> None:
    """Input and output embeddings of exactly ``n_vocab`` rows, as resize_token_embeddings
    leaves them: checkpoint.pt's (already resized) or the base's first rows."""
    for k, jb in enumerate(jobs):
        src = {
            "token_embd.weight": "gpt_neox.embed_in.weight",
            "output.weight": "embed_out.weight",
        }.get(jb.name)
        if src is None:
            continue
        ref = base[src]
        if ref.shape[0] < n_vocab:
            raise UserError(
                f"{src} has {ref.shape[0]} rows but the tokenizer with OpenFlamingo's tokens has "
                f"{n_vocab}: checkpoint.pt must hold the resized embeddings"
            )
        if ref.shape[0] > n_vocab:
            ref = rows_of(ref, 0, n_vocab)
        expect_shape(ref, (n_vocab, n_embd), src)
        jobs[k] = job(jb.name, ref)


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
