"""A Llama/Mistral decoder in llama.cpp's names and layout (the text half of LLaVA, BLIP-2 /
InstructBLIP with Vicuna, ...), written as libllama's ``llama`` architecture."""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import numpy as np

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import Checkpoint, TensorRef
from .base import TensorJob, TextHParams, count_layers, expect_shape, job, require, with_defaults

LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
MISTRAL_DEFAULTS: dict[str, Any] = {
    **LLAMA_DEFAULTS,
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32,
    "sliding_window": 4096,
}


def rope_settings(cfg: dict[str, Any]) -> tuple[float, tuple[str, float] | None]:
    """rope_theta and linear scaling from either spelling (``rope_parameters`` in
    transformers 5 configs, ``rope_theta`` + ``rope_scaling`` before)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        factor = params.get("factor", scaling.get("factor"))
        if not isinstance(factor, (int, float)):
            raise UserError("linear RoPE scaling without a numeric factor")
        return float(theta), ("linear", float(factor))
    raise UserError(f"RoPE scaling {kind!r} is not supported for LLaVA text models")


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K row order -> llama.cpp's interleaved (GPT-J style) rope order."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_text_hparams(cfg: dict[str, Any], *, mistral: bool) -> dict[str, Any]:
    return with_defaults(cfg, MISTRAL_DEFAULTS if mistral else LLAMA_DEFAULTS)


def llama_text_plan(
    ckpt: Checkpoint,
    cfg: dict[str, Any],
    *,
    layer_prefix: str,  # e.g. "model.layers." / "language_model.model.layers."
    embed: str,
    norm: str,
    lm_head: str,
    mistral: bool,
) -> tuple[TextHParams, list[TensorJob]]:
    """Llama/Mistral decoder tensors in llama.cpp's names and layout."""
    c = llama_text_hparams(cfg, mistral=mistral)
    emb = require(ckpt, embed, "token embeddings")
    if len(emb.shape) != 2:
        raise CorruptFileError(f"{embed} must be 2-D, it has shape {list(emb.shape)}")
    n_vocab, n_embd = emb.shape
    n_layer = count_layers(ckpt.names(), re.escape(layer_prefix) + r"(\d+)\.")
    if n_layer == 0:
        raise CorruptFileError(f"The checkpoint has no decoder layers under {layer_prefix!r}")
    n_head = int(c["num_attention_heads"])
    n_head_kv = int(c.get("num_key_value_heads") or n_head)
    head_dim = int(c.get("head_dim") or n_embd // n_head)
    if int(c["hidden_size"]) != n_embd:
        raise CorruptFileError(
            f"config hidden_size {c['hidden_size']} does not match the embeddings' width {n_embd}"
        )
    if int(c["num_hidden_layers"]) != n_layer:
        raise CorruptFileError(
            f"config num_hidden_layers {c['num_hidden_layers']} but the checkpoint has {n_layer}"
        )
    if head_dim % 2 or n_head % n_head_kv:
        raise CorruptFileError(f"unsupported attention shape: {n_head} heads of {head_dim}")
    vocab_cfg = int(c.get("vocab_size") or n_vocab)
    if vocab_cfg != n_vocab:
        raise CorruptFileError(
            f"config vocab_size {vocab_cfg} does not match the embeddings' {n_vocab} rows"
        )
    theta, scaling = rope_settings(c)
    tied = lm_head not in ckpt
    if tied and not c.get("tie_word_embeddings", False):
        raise CorruptFileError(f"The checkpoint has no output head ({lm_head})")

    jobs: list[TensorJob] = [job("token_embd.weight", emb)]
    n_ff = 0
    for i in range(n_layer):
        p = f"{layer_prefix}{i}."

        def g(suffix: str, what: str, _p: str = p) -> TensorRef:
            return require(ckpt, _p + suffix, what)

        q = g("self_attn.q_proj.weight", "attention query")
        k = g("self_attn.k_proj.weight", "attention key")
        v = g("self_attn.v_proj.weight", "attention value")
        o = g("self_attn.o_proj.weight", "attention output")
        gate = g("mlp.gate_proj.weight", "MLP gate")
        up = g("mlp.up_proj.weight", "MLP up")
        down = g("mlp.down_proj.weight", "MLP down")
        n_ff = gate.shape[0]
        expect_shape(q, (n_head * head_dim, n_embd), "attention query")
        expect_shape(k, (n_head_kv * head_dim, n_embd), "attention key")
        expect_shape(v, (n_head_kv * head_dim, n_embd), "attention value")
        expect_shape(o, (n_embd, n_head * head_dim), "attention output")
        expect_shape(up, (n_ff, n_embd), "MLP up")
        expect_shape(down, (n_embd, n_ff), "MLP down")
        b = f"blk.{i}."
        jobs.append(job(b + "attn_norm.weight", g("input_layernorm.weight", "attention norm")))
        jobs.append(job(b + "attn_q.weight", q, partial(_permute_rope, n_head=n_head)))
        jobs.append(job(b + "attn_k.weight", k, partial(_permute_rope, n_head=n_head_kv)))
        jobs.append(job(b + "attn_v.weight", v))
        jobs.append(job(b + "attn_output.weight", o))
        for bias, h in (("q", n_head), ("k", n_head_kv)):
            name = f"{p}self_attn.{bias}_proj.bias"
            if name in ckpt:
                jobs.append(
                    job(f"{b}attn_{bias}.bias", ckpt[name], partial(_permute_rope, n_head=h))
                )
        for bias, out in (("v_proj", "attn_v"), ("o_proj", "attn_output")):
            name = f"{p}self_attn.{bias}.bias"
            if name in ckpt:
                jobs.append(job(f"{b}{out}.bias", ckpt[name]))
        jobs.append(job(b + "ffn_norm.weight", g("post_attention_layernorm.weight", "MLP norm")))
        jobs.append(job(b + "ffn_gate.weight", gate))
        jobs.append(job(b + "ffn_down.weight", down))
        jobs.append(job(b + "ffn_up.weight", up))
    jobs.append(job("output_norm.weight", require(ckpt, norm, "final norm")))
    if not tied:
        head = ckpt[lm_head]
        expect_shape(head, (n_vocab, n_embd), "output head")
        jobs.append(job("output.weight", head))
    sw = c.get("sliding_window")
    hp = TextHParams(
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_ff=n_ff,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ctx=int(c["max_position_embeddings"]),
        rms_eps=float(c["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=int(sw) if mistral and isinstance(sw, int) and sw > 0 else None,
        tied_embeddings=tied,
        base_arch="mistral" if mistral else "llama",
    )
    return hp, jobs
