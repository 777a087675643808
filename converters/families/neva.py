"""NeVA (NVIDIA NeMo's LLaVA): ``mmchat convert model.nemo``.

A NeMo 1.x ``.nemo`` (see ``converters/nemo_archive.py``) holds the Megatron language model,
NeVA's projector (``...word_embeddings.adapter_layer.mm_projector_adapter.mm_projector``),
the SentencePiece tokenizer and ``model_config.yaml``; the CLIP tower is named by
``mm_cfg.vision_encoder.from_pretrained`` (a Hugging Face repo or folder), or given with
``--vision-tower PATH``.

Language models, as NeMo's own ``scripts/checkpoint_converters`` map them:

* Llama-2/3 (``normalization: rmsnorm``, ``activation: [fast-]swiglu``) -> libllama ``llama``.
  ``linear_qkv`` / ``query_key_value`` rows are interleaved per query group (the group's q
  heads, then its k head, then its v head); ``linear_fc1`` is [gate; up]
  (older checkpoints: ``dense_h_to_4h`` = gate, ``dense_h_to_4h_2`` = up).
* Nemotron-3 (``normalization: layernorm1p``, ``activation: squared-relu``) -> libllama
  ``nemotron``: LayerNorm whose stored weight is w - 1 (written as w + 1), squared ReLU,
  rotary embedding on the first ``rotary_percentage`` of each head (rotate-half, which is
  llama.cpp's NEOX order, so no row permutation).

Projectors (``mm_cfg.mm_mlp_adapter_type``): ``linear`` (mmvision type ``linear``),
``mlp2x_gelu`` (``mlp``, as LLaVA 1.5), ``mlpNx_gelu`` N > 2 (``mlp_deep``: mm.0, mm.2, ...
with exact GELU between), ``mlp_downsample`` (``mlp_downsample``: 2x2 neighbouring patches
concatenated, LayerNorm mm.1, mm.2, GELU, mm.4). The last three need libmmvision (mtmd's
``mlp`` would apply its GELU to a linear projector and knows none of the others).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import Checkpoint, TensorRef, open_checkpoint
from ..nemo_archive import NEMO2_MESSAGE, NemoArchive, is_nemo2_folder
from ..tokenizer import Vocab, read_sentencepiece
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
from .clip import VisionHParams, clip_vision_plan
from .llama_text import _permute_rope
from .llava_original import _tower_config, resolve_tower
from .neva_templates import adds_dummy_prefix, hf_tokenizer, neva_template, turn_end_token
from .qwen2_text import load_bpe_vocab

_ADAPTER = "adapter_layer.mm_projector_adapter.mm_projector."


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


def _cfg(c: dict[str, Any], key: str, default: Any = None) -> Any:
    v = c.get(key)
    return default if v is None else v


def _deinterleave(
    w: np.ndarray, *, n_groups: int, per_group: int, head_dim: int, part: str
) -> np.ndarray:
    """q, k or v rows of a Megatron fused QKV weight/bias (rows grouped per query group)."""
    rest = w.shape[1:]
    g = w.reshape(n_groups, per_group + 2, head_dim, *rest)
    if part == "q":
        out = g[:, :per_group]
    elif part == "k":
        out = g[:, per_group : per_group + 1]
    else:
        out = g[:, per_group + 1 :]
    return np.ascontiguousarray(out.reshape(-1, *rest))


def _half(a: np.ndarray, *, first: bool) -> np.ndarray:
    """gate (first) or up half of a fused swiglu fc1 [gate; up]."""
    n = a.shape[0] // 2
    return np.ascontiguousarray(a[:n] if first else a[n:])


def _qkv_part(
    w: np.ndarray, *, n_groups: int, per_group: int, head_dim: int, part: str, rope_heads: int
) -> np.ndarray:
    """q, k or v of a fused QKV; with ``rope_heads`` also in llama.cpp's rope row order."""
    out = _deinterleave(w, n_groups=n_groups, per_group=per_group, head_dim=head_dim, part=part)
    return _permute_rope(out, rope_heads) if rope_heads else out


class _Layout:
    """Where a checkpoint keeps each tensor (Megatron-core or the older language_model)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        names = ckpt.names()
        for root in ("model.", "model.module."):
            if f"{root}decoder.layers.0.self_attention.linear_qkv.weight" in ckpt:
                self.mcore, self.root = True, root
                break
            if (
                f"{root}language_model.encoder.layers.0.self_attention.query_key_value.weight"
                in ckpt
            ):
                self.mcore, self.root = False, root
                break
        else:
            raise UserError(
                "The .nemo holds no Megatron GPT decoder (model.decoder.layers.N.* or "
                "model.language_model.encoder.layers.N.*): it is not a NeVA / GPT model"
            )
        r = self.root
        self.layers = f"{r}decoder.layers." if self.mcore else f"{r}language_model.encoder.layers."
        self.n_layer = count_layers(names, re.escape(self.layers) + r"(\d+)\.")
        lm = r if self.mcore else f"{r}language_model."
        self.embed = f"{lm}embedding.word_embeddings.weight"
        self.final = (
            f"{r}decoder.final_layernorm." if self.mcore else f"{lm}encoder.final_layernorm."
        )
        self.output = f"{lm}output_layer.weight"
        hits = sorted({n[: n.index(_ADAPTER) + len(_ADAPTER)] for n in names if _ADAPTER in n})
        self.projector = hits[0] if len(hits) == 1 else None

    def layer(self, i: int) -> dict[str, str]:
        p = f"{self.layers}{i}."
        if self.mcore:
            return {
                "qkv": p + "self_attention.linear_qkv.",
                "proj": p + "self_attention.linear_proj.",
                "fc1": p + "mlp.linear_fc1.",
                "fc2": p + "mlp.linear_fc2.",
                "ln1": p + "self_attention.linear_qkv.layer_norm_",
                "ln2": p + "mlp.linear_fc1.layer_norm_",
                "ln1_alt": p + "input_layernorm.",
                "ln2_alt": p + "pre_mlp_layernorm.",
            }
        return {
            "qkv": p + "self_attention.query_key_value.",
            "proj": p + "self_attention.dense.",
            "fc1": p + "mlp.dense_h_to_4h.",
            "fc1b": p + "mlp.dense_h_to_4h_2.",
            "fc2": p + "mlp.dense_4h_to_h.",
            "ln1": p + "input_layernorm.",
            "ln2": p + "post_attention_layernorm.",
        }


def _norm_ref(ckpt: Checkpoint, names: dict[str, str], key: str, kind: str) -> TensorRef | None:
    """A layer norm's weight/bias: TE fuses it into the next linear (layer_norm_weight);
    the local spec keeps it as its own module."""
    fused = names[key] + kind
    if fused in ckpt:
        return ckpt[fused]
    alt = names.get(key + "_alt")
    if alt is not None and alt + kind in ckpt:
        return ckpt[alt + kind]
    return None


def _plus_one(a: np.ndarray) -> np.ndarray:
    return a + np.float32(1.0)


def text_plan(ckpt: Checkpoint, cfg: dict[str, Any]) -> tuple[TextHParams, list[TensorJob]]:
    lay = _Layout(ckpt)
    norm = str(_cfg(cfg, "normalization", "layernorm"))
    act = str(_cfg(cfg, "activation", "gelu"))
    if norm == "rmsnorm" and act in ("swiglu", "fast-swiglu"):
        arch = "llama"
    elif norm == "layernorm1p" and act == "squared-relu":
        arch = "nemotron"
    else:
        raise UserError(
            f"NeVA language model with normalization {norm!r} and activation {act!r} is not "
            "supported (Llama: rmsnorm + swiglu; Nemotron: layernorm1p + squared-relu)"
        )
    if str(_cfg(cfg, "position_embedding_type", "learned_absolute")) != "rope":
        raise UserError(
            "Only rotary position embeddings (position_embedding_type: rope) are supported"
        )
    emb = require(ckpt, lay.embed, "token embeddings")
    if len(emb.shape) != 2:
        raise CorruptFileError(f"{lay.embed} must be 2-D")
    n_vocab, n_embd = emb.shape
    n_layer = lay.n_layer
    if n_layer == 0:
        raise CorruptFileError("The checkpoint has no decoder layers")
    if int(_cfg(cfg, "num_layers", n_layer)) != n_layer:
        raise CorruptFileError(
            f"config num_layers {cfg.get('num_layers')} but the checkpoint has {n_layer}"
        )
    if int(_cfg(cfg, "hidden_size", n_embd)) != n_embd:
        raise CorruptFileError(
            f"config hidden_size {cfg.get('hidden_size')} != embeddings width {n_embd}"
        )
    n_head = int(_cfg(cfg, "num_attention_heads", 0))
    if n_head <= 0:
        raise CorruptFileError("model_config.yaml has no num_attention_heads")
    n_kv = int(_cfg(cfg, "num_query_groups", n_head))
    head_dim = int(_cfg(cfg, "kv_channels", n_embd // n_head))
    if n_head % n_kv:
        raise CorruptFileError(f"{n_head} heads do not split into {n_kv} query groups")
    per = n_head // n_kv
    rot = float(_cfg(cfg, "rotary_percentage", 1.0))
    rope_dim = round(head_dim * rot)
    if rope_dim % 2 or rope_dim <= 0:
        raise UserError(f"rotary_percentage {rot} gives an odd rotary width {rope_dim}")
    if arch == "llama" and rope_dim != head_dim:
        raise UserError("partial rotary embeddings are supported for Nemotron only")
    eps = float(_cfg(cfg, "layernorm_epsilon", 1e-5))
    scale = cfg.get("seq_len_interpolation_factor")
    if cfg.get("scale_positional_embedding"):
        raise UserError("Llama-3.1 RoPE scaling (scale_positional_embedding) is not supported")
    tied = bool(_cfg(cfg, "share_embeddings_and_output_weights", True)) and lay.output not in ckpt
    if not tied and lay.output not in ckpt:
        raise CorruptFileError(f"The checkpoint has no output layer ({lay.output})")
    one_p = norm == "layernorm1p"

    jobs: list[TensorJob] = [job("token_embd.weight", emb)]
    n_ff = 0
    qkv_rows = (n_head + 2 * n_kv) * head_dim
    for i in range(n_layer):
        names = lay.layer(i)
        b = f"blk.{i}."

        def g(key: str, what: str, _n: dict[str, str] = names) -> TensorRef:
            return require(ckpt, _n[key] + "weight", what)

        def norm_jobs(
            key: str, gg: str, what: str, _n: dict[str, str] = names, _b: str = b
        ) -> None:
            w = _norm_ref(ckpt, _n, key, "weight")
            if w is None:
                raise CorruptFileError(f"The checkpoint has no {what} ({_b[:-1]})")
            expect_shape(w, (n_embd,), what)
            jobs.append(job(f"{_b}{gg}.weight", w, _plus_one if one_p else None))
            bias = _norm_ref(ckpt, _n, key, "bias")
            if bias is not None:
                jobs.append(job(f"{_b}{gg}.bias", bias))

        norm_jobs("ln1", "attn_norm", "attention norm")
        qkv = g("qkv", "fused QKV")
        expect_shape(qkv, (qkv_rows, n_embd), "fused QKV")
        for part, rows, heads in (("q", n_head, n_head), ("k", n_kv, n_kv), ("v", n_kv, n_kv)):
            tf = partial(
                _qkv_part,
                n_groups=n_kv,
                per_group=per,
                head_dim=head_dim,
                part=part,
                rope_heads=heads if arch == "llama" and part != "v" else 0,
            )
            jobs.append(job(f"{b}attn_{part}.weight", qkv, tf, (rows * head_dim, n_embd)))
            bias_name = names["qkv"] + "bias"
            if bias_name in ckpt:
                jobs.append(job(f"{b}attn_{part}.bias", ckpt[bias_name], tf, (rows * head_dim,)))
        proj = g("proj", "attention output")
        expect_shape(proj, (n_embd, n_head * head_dim), "attention output")
        jobs.append(job(f"{b}attn_output.weight", proj))
        if names["proj"] + "bias" in ckpt:
            jobs.append(job(f"{b}attn_output.bias", ckpt[names["proj"] + "bias"]))
        norm_jobs("ln2", "ffn_norm", "MLP norm")
        fc1 = g("fc1", "MLP fc1")
        fc2 = g("fc2", "MLP fc2")
        n_ff = fc2.shape[1]
        expect_shape(fc2, (n_embd, n_ff), "MLP fc2")
        if arch == "llama":
            if "fc1b" in names and names["fc1b"] + "weight" in ckpt:
                # older layout with 'swiglu': gate and up in two tensors ('fast-swiglu'
                # fuses them in dense_h_to_4h, as Megatron-core's linear_fc1 does)
                expect_shape(fc1, (n_ff, n_embd), "MLP gate")
                up = g("fc1b", "MLP up")
                expect_shape(up, (n_ff, n_embd), "MLP up")
                jobs.append(job(f"{b}ffn_gate.weight", fc1))
                jobs.append(job(f"{b}ffn_up.weight", up))
            else:
                expect_shape(fc1, (2 * n_ff, n_embd), "MLP fc1 (gate; up)")
                shape = (n_ff, n_embd)
                jobs.append(job(f"{b}ffn_gate.weight", fc1, partial(_half, first=True), shape))
                jobs.append(job(f"{b}ffn_up.weight", fc1, partial(_half, first=False), shape))
        else:
            expect_shape(fc1, (n_ff, n_embd), "MLP fc1")
            jobs.append(job(f"{b}ffn_up.weight", fc1))
            if names["fc1"] + "bias" in ckpt:
                jobs.append(job(f"{b}ffn_up.bias", ckpt[names["fc1"] + "bias"]))
        jobs.append(job(f"{b}ffn_down.weight", fc2))
        if names["fc2"] + "bias" in ckpt:
            jobs.append(job(f"{b}ffn_down.bias", ckpt[names["fc2"] + "bias"]))
    fw = require(ckpt, lay.final + "weight", "final norm")
    jobs.append(job("output_norm.weight", fw, _plus_one if one_p else None))
    if lay.final + "bias" in ckpt:
        jobs.append(job("output_norm.bias", ckpt[lay.final + "bias"]))
    if not tied:
        head = ckpt[lay.output]
        expect_shape(head, (n_vocab, n_embd), "output layer")
        jobs.append(job("output.weight", head))
    hp = TextHParams(
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_ff=n_ff,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_kv,
        head_dim=head_dim,
        n_ctx=int(_cfg(cfg, "encoder_seq_length", _cfg(cfg, "max_position_embeddings", 4096))),
        rms_eps=eps,
        rope_theta=float(_cfg(cfg, "rotary_base", 10000.0)),
        rope_scaling=("linear", float(scale)) if scale and float(scale) != 1.0 else None,
        tied_embeddings=tied,
        gguf_arch=arch,
        rope_dim=rope_dim if rope_dim != head_dim else None,
    )
    return hp, jobs


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
        if int(_cfg(cfg, "pipeline_model_parallel_size", 1)) != arc.pp:
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
        if int(_cfg(venc, "class_token_length", 1)) != 1:
            raise UserError("Only CLIP towers with one class token are supported")
        clip_hp, vis_jobs = clip_vision_plan(
            tower,
            vcfg,
            prefix=prefix,
            select_layer=_cfg(venc, "vision_select_layer", -2),
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
        kind = str(_cfg(mm, "mm_mlp_adapter_type", "linear"))
        proj_type, merge, proj_jobs = projector_plan(
            arc.weights,
            _Layout(arc.weights).projector,
            kind,
            vision_width=clip_hp.n_embd,
            text_width=text_hp.n_embd,
        )
        vis_hp = NevaVisionHParams(**{**clip_hp.__dict__, "projector_type": proj_type}, merge=merge)
        data = cfg.get("data") or {}
        conv = str(_cfg(data, "conv_template", "nvgpt"))
        start_end = bool(mm.get("use_im_start_end", False))
        model_type = str(_cfg(mm.get("llm") or {}, "model_type", "nvgpt"))
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
        if str(data.get("image_aspect_ratio", "square")) != "pad":
            notes.append(
                "NeVA resizes and centre-crops non-square images (image_aspect_ratio "
                f"{data.get('image_aspect_ratio', 'square')!r}); mmchat pads them to a square"
            )
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
        )
