"""NeVA (NVIDIA NeMo's LLaVA): ``mmchat convert model.nemo``.

A NeMo 1.x ``.nemo`` (see ``converters/nemo_archive.py``) holds the Megatron language model,
NeVA's projector (``...word_embeddings.adapter_layer.mm_projector_adapter.mm_projector``),
usually the tokenizer and ``model_config.yaml``; the CLIP tower is named by
``mm_cfg.vision_encoder.from_pretrained`` (a Hugging Face repo or folder), or given with
``--vision-tower PATH``.

The language model (Llama-2/3 -> ``llama``, Nemotron-3 -> ``nemotron``, NVGPT -> ``stablelm``)
is mapped in ``neva_text.py``; the tokenizer (SentencePiece inside the archive, or Llama-3's
Hugging Face BPE) and the conversation templates are in ``neva_templates.py``.

Projectors (``mm_cfg.mm_mlp_adapter_type``): ``linear`` (mmvision type ``linear``),
``mlp2x_gelu`` (``mlp``, as LLaVA 1.5), ``mlpNx_gelu`` N > 2 (``mlp_deep``: mm.0, mm.2, ...
with exact GELU between), ``mlp_downsample`` (``mlp_downsample``: 2x2 neighbouring patches
concatenated, LayerNorm mm.1, mm.2, GELU, mm.4). The last three need libmmvision (mtmd's
``mlp`` would apply its GELU to a linear projector and knows none of the others).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import Checkpoint, open_checkpoint
from ..nemo_archive import NEMO2_MESSAGE, NemoArchive, is_nemo2_folder
from ..tokenizer import Vocab, read_sentencepiece
from .base import (
    FamilyPlan,
    TensorJob,
    expect_shape,
    image_norm_from,
    job,
    require,
)
from .clip import VisionHParams, clip_vision_plan
from .llava_original import _tower_config, resolve_tower
from .neva_templates import adds_dummy_prefix, hf_tokenizer, neva_template, turn_end_token
from .neva_text import Layout, cfg_get, text_plan
from .qwen2_text import load_bpe_vocab

# the mmproj key mmchat's LLaVA engine reads (mmchat.vision.engine.PREPROCESS_KEY)
PREPROCESS_KEY = "mmchat.vision.image_preprocess"


def nemo_source(source: str | Path) -> Path | None:
    """The path when ``source`` is a ``.nemo`` archive (or one unpacked into a folder); a NeMo
    2.0 folder is refused with one line saying what to do; anything else is None."""
    p = Path(source).expanduser()
    if p.is_dir():
        if is_nemo2_folder(p):
            raise UserError(NEMO2_MESSAGE.format(path=p))
        if (p / "model_config.yaml").is_file():  # an unpacked .nemo
            return p.resolve()
        return None
    if p.suffix.lower() == ".nemo":
        if not p.is_file():
            raise UserError(f"No such file: {p}")
        return p.resolve()
    return None


@dataclass
class NevaVisionHParams(VisionHParams):
    merge: int = 1  # 2 for mlp_downsample: 2x2 patches per row

    @property
    def n_image_tokens(self) -> int:
        g = self.image_size // self.patch_size
        g = -(-g // self.merge)
        return g * g

    def description(self, name: str) -> str:
        return (
            f"CLIP vision tower + NeVA {self.projector_type} projector of {name} "
            "(converted by mmchat)"
        )


def projector_plan(
    ckpt: Checkpoint, prefix: str | None, kind: str, *, vision_width: int, text_width: int
) -> tuple[str, int, list[TensorJob]]:
    """(mmproj projector type, patch merge factor, tensor jobs)."""
    if prefix is None:
        raise CorruptFileError(
            "The .nemo has no NeVA projector (…adapter_layer.mm_projector_adapter.mm_projector.*)"
        )

    def lin(idx: str, out_name: str, n_in: int, n_out: int) -> list[TensorJob]:
        w = require(ckpt, f"{prefix}{idx}weight", f"projector {out_name}")
        if len(w.shape) != 2:
            raise CorruptFileError(f"projector {out_name} must be 2-D")
        if w.shape[1] != n_in:
            raise UserError(
                f"The projector expects image features of width {w.shape[1]} but gets {n_in}: "
                "the vision tower does not belong to this model"
            )
        if w.shape[0] != n_out:
            raise UserError(
                f"The projector outputs width {w.shape[0]} but the language model is {n_out} wide"
            )
        out = [job(f"{out_name}.weight", w)]
        if f"{prefix}{idx}bias" in ckpt:
            out.append(job(f"{out_name}.bias", ckpt[f"{prefix}{idx}bias"]))
        return out

    if kind == "linear":
        return "linear", 1, lin("", "mm.0", vision_width, text_width)
    if kind == "mlp_downsample":
        ln_w = require(ckpt, f"{prefix}1.weight", "projector LayerNorm")
        expect_shape(ln_w, (4 * vision_width,), "projector LayerNorm")
        jobs = [job("mm.1.weight", ln_w), job("mm.1.bias", require(ckpt, f"{prefix}1.bias", "LN"))]
        jobs += lin("2.", "mm.2", 4 * vision_width, text_width)
        jobs += lin("4.", "mm.4", text_width, text_width)
        return "mlp_downsample", 2, jobs
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if m and int(m.group(1)) >= 2:
        depth = int(m.group(1))
        jobs = lin("0.", "mm.0", vision_width, text_width)
        for k in range(1, depth):
            jobs += lin(f"{2 * k}.", f"mm.{2 * k}", text_width, text_width)
        if f"{prefix}{2 * depth}.weight" in ckpt:
            raise CorruptFileError(f"the projector has more layers than {kind} says")
        return ("mlp" if depth == 2 else "mlp_deep"), 1, jobs
    raise UserError(
        f"NeVA projector {kind!r} (mm_mlp_adapter_type) is not supported; mmchat converts "
        "linear, mlp2x_gelu / mlpNx_gelu and mlp_downsample"
    )


class NevaFamily:
    name: ClassVar[str] = "neva"
    architectures: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        return False  # chosen by the .nemo file, not by a config.json

    def plan(
        self, folder: Path, config: dict[str, Any], *, vision_tower: Path | None
    ) -> FamilyPlan:
        arc = NemoArchive(folder)
        cfg = arc.config
        mm = cfg.get("mm_cfg")
        if not isinstance(mm, dict):
            raise UserError(
                f"{folder.name} is a NeMo model without mm_cfg: not a NeVA (multimodal) model"
            )
        if int(cfg_get(cfg, "pipeline_model_parallel_size", 1)) != arc.pp:
            raise CorruptFileError(
                f"{folder.name}: pipeline_model_parallel_size does not match the archive's shards"
            )
        notes: list[str] = []
        text_hp, text_jobs = text_plan(arc.weights, cfg)

        # tokenizer: the SentencePiece model inside the archive, or (Llama-3) the Hugging Face
        # tokenizer the config names
        tok = cfg.get("tokenizer") or {}
        library = str(tok.get("library", "sentencepiece"))
        model_ref = str(tok.get("model") or tok.get("tokenizer_model") or "")
        tok_path: Path | None = None
        if library == "sentencepiece" and model_ref:
            member = arc.find(Path(model_ref.removeprefix("nemo:")).name)
            if member is None:
                raise CorruptFileError(
                    f"{folder.name} does not contain its tokenizer {model_ref!r}"
                )
            tok_path = arc.extract(member, "tokenizer.model")
            tok_dir = tok_path.parent
        elif library == "huggingface" and tok.get("type"):
            tok_dir = hf_tokenizer(str(tok["type"]), folder.parent)
        else:
            raise UserError(
                f"The NeVA tokenizer is {library!r} ({tok.get('type')}); mmchat converts NeVA "
                "models with a SentencePiece tokenizer inside the .nemo (Llama-2, Nemotron) "
                "or a Hugging Face byte-level BPE one (Llama-3)"
            )

        # vision tower
        venc = mm.get("vision_encoder") or {}
        if not venc.get("from_hf", True) and vision_tower is None:
            raise UserError(
                "This NeVA uses a NeMo CLIP tower (vision_encoder.from_hf: false); give a "
                "Hugging Face CLIP tower with --vision-tower PATH"
            )
        named = {"mm_vision_tower": venc.get("from_pretrained")}
        tower_dir, source = resolve_tower(folder.parent, named, vision_tower)
        vcfg = _tower_config(tower_dir)
        tower = open_checkpoint(tower_dir)
        if "vision_model.embeddings.patch_embedding.weight" in tower:
            prefix = "vision_model."
        elif "embeddings.patch_embedding.weight" in tower:
            prefix = ""
        else:
            raise UserError(f"{tower_dir} does not hold a CLIP vision tower")
        mean, std = image_norm_from([tower_dir], notes)
        if str(venc.get("vision_select_feature", "patch")) != "patch":
            raise UserError("Only vision_select_feature 'patch' (class token dropped) is supported")
        if int(cfg_get(venc, "class_token_length", 1)) != 1:
            raise UserError("Only CLIP towers with one class token are supported")
        clip_hp, vis_jobs = clip_vision_plan(
            tower,
            vcfg,
            prefix=prefix,
            select_layer=cfg_get(venc, "vision_select_layer", -2),
            image_mean=mean,
            image_std=std,
            projection_dim=text_hp.n_embd,
        )
        crop = venc.get("crop_size")
        if isinstance(crop, list) and crop and any(int(c) != clip_hp.image_size for c in crop):
            raise UserError(
                f"crop_size {crop} does not match the tower's image_size {clip_hp.image_size}"
            )
        hidden = venc.get("hidden_size")
        if hidden is not None and int(hidden) != clip_hp.n_embd:
            raise UserError(
                f"The NeVA expects a vision tower of width {hidden} but {source} has width "
                f"{clip_hp.n_embd}"
            )
        kind = str(cfg_get(mm, "mm_mlp_adapter_type", "linear"))
        proj_type, merge, proj_jobs = projector_plan(
            arc.weights,
            Layout(arc.weights).projector,
            kind,
            vision_width=clip_hp.n_embd,
            text_width=text_hp.n_embd,
        )
        vis_hp = NevaVisionHParams(**{**clip_hp.__dict__, "projector_type": proj_type}, merge=merge)
        data = cfg.get("data") or {}
        conv = str(cfg_get(data, "conv_template", "nvgpt"))
        start_end = bool(mm.get("use_im_start_end", False))
        model_type = str(cfg_get(mm.get("llm") or {}, "model_type", "nvgpt"))
        template = neva_template(
            conv,
            use_im_start_end=start_end,
            # SentencePiece's one "▁" before the whole prompt, written by the template
            dummy_prefix=tok_path is not None and adds_dummy_prefix(tok_path),
            model_type=model_type,
        )
        if data.get("sep_image_conv_front"):
            notes.append(
                "sep_image_conv_front is set; mmchat places the image at the message start"
            )
        aspect = str(cfg_get(data, "image_aspect_ratio", "square"))
        if aspect not in ("square", "pad"):
            raise UserError(f"NeVA image_aspect_ratio {aspect!r} is not supported (square or pad)")
        # 'square': CLIPImageProcessor's resize of the short side + centre crop; 'pad':
        # LLaVA's expand2square with the mean colour (the engine's default)
        vision_kv = [(PREPROCESS_KEY, "resize_crop")] if aspect == "square" else []
        eos = turn_end_token(conv)
        eos_id: int | None = None
        vocab: Vocab | None = None
        if tok_path is not None:
            text_hp.add_space_prefix = False  # the template writes SentencePiece's one "▁"
            pieces = read_sentencepiece(tok_path).pieces
            eos_id = pieces.index(eos) if eos is not None and eos in pieces else None
        else:
            vocab = load_bpe_vocab(
                tok_dir, vocab_size=text_hp.n_vocab, config={}, default_template=template
            )
            vocab.pre = "llama-bpe"  # Llama-3's pre-tokenizer regex (and ignore_merges)
            # NeVA's own conversation, not the tokenizer folder's chat template
            vocab.chat_template, vocab.template_source = template, "family default"
            vocab.add_bos = False  # the template writes <|begin_of_text|>
            if eos is not None and eos in vocab.tokens:
                vocab.eos_id = vocab.tokens.index(eos)
        return FamilyPlan(
            family=self.name,
            architecture=f"NeVA ({text_hp.gguf_arch}, {kind}, {conv})",
            text=text_hp,
            text_tensors=text_jobs,
            vision=vis_hp,
            vision_tensors=vis_jobs + proj_jobs,
            tokenizer_dir=tok_dir,
            default_template=template,
            config_ids={"bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": None},
            notes=notes,
            vision_source=source,
            # NeMo encodes the whole prompt at once: no dummy "▁" after a special token
            legacy_spaces=False,
            add_bos=False,  # NeVA's text_to_ids adds no BOS (llama_2 writes <s> itself)
            vocab=vocab,
            vision_kv=vision_kv,
        )
