"""The language model of a NeVA ``.nemo``: Megatron GPT keys -> libllama tensors.

Layouts, as NeMo's own ``scripts/checkpoint_converters`` map them: Megatron-core
(``model.decoder.layers.N.self_attention.linear_qkv`` + TE-fused layer norms, or the local
spec's ``input_layernorm`` / ``pre_mlp_layernorm``) and the older
``model.language_model.encoder.layers.N`` (``query_key_value``, ``dense``, ``dense_h_to_4h``
[+ ``dense_h_to_4h_2``], ``dense_4h_to_h``), under ``model.`` or ``model.module.`` (O2).

* Llama-2/3 (rmsnorm + swiglu) -> ``llama`` (q/k rows in llama.cpp's rope order);
* Nemotron-3 (layernorm1p + squared-relu) -> ``nemotron``;
* NVGPT (layernorm1p + swiglu, partial rotary) -> ``stablelm``.
LayerNorm1p stores w - 1 (written as w + 1); the LayerNorm archs rotate the first
``rotary_percentage`` of each head in rotate-half (NEOX) order, as Megatron does.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import numpy as np

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import Checkpoint, TensorRef
from .base import TensorJob, TextHParams, count_layers, expect_shape, job, require
from .llama_text import _permute_rope

ADAPTER = "adapter_layer.mm_projector_adapter.mm_projector."


def cfg_get(c: dict[str, Any], key: str, default: Any = None) -> Any:
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


class Layout:
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
        hits = sorted({n[: n.index(ADAPTER) + len(ADAPTER)] for n in names if ADAPTER in n})
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


_KNOWN_IN_LAYER = re.compile(
    r"(self_attention\.(linear_qkv|linear_proj|query_key_value|dense)|"
    r"mlp\.(linear_fc1|linear_fc2|dense_h_to_4h|dense_h_to_4h_2|dense_4h_to_h))\."
    r"(weight|bias|layer_norm_weight|layer_norm_bias)$|"
    r"(input_layernorm|pre_mlp_layernorm|post_attention_layernorm)\.(weight|bias)$|"
    r".*_extra_state$"
)


def check_known(ckpt: Checkpoint, lay: Layout) -> None:
    """Refuse tensors this converter would silently drop (qk-norms, MoE experts, ...)."""
    layer = re.compile(re.escape(lay.layers) + r"\d+\.(.*)$")
    other = (lay.embed, lay.output)
    odd = []
    for name in ckpt.names():
        m = layer.match(name)
        if m:
            if not _KNOWN_IN_LAYER.match(m.group(1)):
                odd.append(name)
        elif not (
            name in other
            or name.startswith(lay.final)
            or ADAPTER in name
            or name.endswith(("rotary_pos_emb.inv_freq", "_extra_state"))
        ):
            odd.append(name)
    if odd:
        raise UserError(
            f"The checkpoint has tensors mmchat does not know how to convert ({len(odd)}: "
            f"{', '.join(odd[:4])}{', ...' if len(odd) > 4 else ''}); this NeVA variant is "
            "not supported"
        )


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
    lay = Layout(ckpt)
    check_known(ckpt, lay)
    norm = str(cfg_get(cfg, "normalization", "layernorm"))
    act = str(cfg_get(cfg, "activation", "gelu"))
    swiglu = act in ("swiglu", "fast-swiglu")
    if norm == "rmsnorm" and swiglu:
        arch = "llama"
    elif norm in ("layernorm1p", "layernorm") and act == "squared-relu":
        arch = "nemotron"
    elif norm in ("layernorm1p", "layernorm") and swiglu:
        # NVGPT (NeVA-22B's LLM): LayerNorm + SwiGLU + partial rotary, which is libllama's
        # stablelm (sequential residual, NEOX rotary on the first rope_dim dims)
        arch = "stablelm"
    else:
        raise UserError(
            f"NeVA language model with normalization {norm!r} and activation {act!r} is not "
            "supported (Llama: rmsnorm + swiglu; Nemotron: layernorm1p + squared-relu; "
            "NVGPT: layernorm1p + swiglu)"
        )
    if str(cfg_get(cfg, "position_embedding_type", "learned_absolute")) != "rope":
        raise UserError(
            "Only rotary position embeddings (position_embedding_type: rope) are supported"
        )
    for key, want in (
        ("transformer_block_type", "pre_ln"),
        ("normalize_attention_scores", True),
        ("headscale", False),
        ("num_moe_experts", None),
    ):
        got = cfg.get(key, want)
        if got is not None and got != want:
            raise UserError(f"NeVA language model with {key}: {got!r} is not supported")
    emb = require(ckpt, lay.embed, "token embeddings")
    if len(emb.shape) != 2:
        raise CorruptFileError(f"{lay.embed} must be 2-D")
    n_vocab, n_embd = emb.shape
    n_layer = lay.n_layer
    if n_layer == 0:
        raise CorruptFileError("The checkpoint has no decoder layers")
    if int(cfg_get(cfg, "num_layers", n_layer)) != n_layer:
        raise CorruptFileError(
            f"config num_layers {cfg.get('num_layers')} but the checkpoint has {n_layer}"
        )
    if int(cfg_get(cfg, "hidden_size", n_embd)) != n_embd:
        raise CorruptFileError(
            f"config hidden_size {cfg.get('hidden_size')} != embeddings width {n_embd}"
        )
    n_head = int(cfg_get(cfg, "num_attention_heads", 0))
    if n_head <= 0:
        raise CorruptFileError("model_config.yaml has no num_attention_heads")
    n_kv = int(cfg_get(cfg, "num_query_groups", n_head))
    head_dim = int(cfg_get(cfg, "kv_channels", n_embd // n_head))
    if n_head % n_kv:
        raise CorruptFileError(f"{n_head} heads do not split into {n_kv} query groups")
    per = n_head // n_kv
    rot = float(cfg_get(cfg, "rotary_percentage", 1.0))
    rope_dim = round(head_dim * rot)
    if rope_dim % 2 or rope_dim <= 0:
        raise UserError(f"rotary_percentage {rot} gives an odd rotary width {rope_dim}")
    if arch == "llama" and rope_dim != head_dim:
        raise UserError("partial rotary embeddings are supported for LayerNorm models only")
    eps = float(cfg_get(cfg, "layernorm_epsilon", 1e-5))
    scale = cfg.get("seq_len_interpolation_factor")
    if cfg.get("scale_positional_embedding"):
        raise UserError("Llama-3.1 RoPE scaling (scale_positional_embedding) is not supported")
    tied = (
        bool(cfg_get(cfg, "share_embeddings_and_output_weights", True)) and lay.output not in ckpt
    )
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
        if swiglu:
            fc1_bias = names["fc1"] + "bias"
            if "fc1b" in names and names["fc1b"] + "weight" in ckpt:
                # older layout with 'swiglu': gate and up in two tensors ('fast-swiglu'
                # fuses them in dense_h_to_4h, as Megatron-core's linear_fc1 does)
                expect_shape(fc1, (n_ff, n_embd), "MLP gate")
                up = g("fc1b", "MLP up")
                expect_shape(up, (n_ff, n_embd), "MLP up")
                jobs.append(job(f"{b}ffn_gate.weight", fc1))
                jobs.append(job(f"{b}ffn_up.weight", up))
                if fc1_bias in ckpt:
                    jobs.append(job(f"{b}ffn_gate.bias", ckpt[fc1_bias]))
                    up_bias = require(ckpt, names["fc1b"] + "bias", "MLP up bias")
                    jobs.append(job(f"{b}ffn_up.bias", up_bias))
            else:
                expect_shape(fc1, (2 * n_ff, n_embd), "MLP fc1 (gate; up)")
                shape = (n_ff, n_embd)
                jobs.append(job(f"{b}ffn_gate.weight", fc1, partial(_half, first=True), shape))
                jobs.append(job(f"{b}ffn_up.weight", fc1, partial(_half, first=False), shape))
                if fc1_bias in ckpt:
                    bias = ckpt[fc1_bias]
                    for half, first in (("gate", True), ("up", False)):
                        tf = partial(_half, first=first)
                        jobs.append(job(f"{b}ffn_{half}.bias", bias, tf, (n_ff,)))
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
        n_ctx=int(
            cfg_get(cfg, "encoder_seq_length", cfg_get(cfg, "max_position_embeddings", 4096))
        ),
        rms_eps=eps,
        rope_theta=float(cfg_get(cfg, "rotary_base", 10000.0)),
        rope_scaling=("linear", float(scale)) if scale and float(scale) != 1.0 else None,
        tied_embeddings=tied,
        gguf_arch=arch,
        rope_dim=rope_dim if rope_dim != head_dim else None,
    )
    return hp, jobs
