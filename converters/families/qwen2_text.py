"""A Qwen2 decoder (the text half of NVLM-D and InternVL) as libllama's ``qwen2`` architecture,
and its byte-level BPE vocabulary (``tokenizer.json``) as a ``gpt2`` GGUF tokenizer with the
``qwen2`` pre-tokenizer.

Differences from ``llama_text``: q/k/v carry biases, and llama.cpp runs Qwen2 with NEOX
(rotate-half) RoPE, which is transformers' order, so q/k rows are written unpermuted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import Checkpoint, TensorRef
from ..tokenizer import CONTROL, NORMAL, UNUSED, USER_DEFINED, Vocab, find_chat_template
from .base import TensorJob, TextHParams, count_layers, expect_shape, job, read_json_opt, require
from .llama_text import rope_settings

QWEN2_DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}

# ChatML as Qwen2 / NVLM-D / InternVL use it (no default system prompt)
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def qwen2_text_plan(
    ckpt: Checkpoint, cfg: dict[str, Any], *, prefix: str, lm_head: str
) -> tuple[TextHParams, list[TensorJob]]:
    """Qwen2 tensors under ``prefix`` (e.g. ``language_model.model.``) in llama.cpp's names."""
    c = dict(QWEN2_DEFAULTS)
    c.update({k: v for k, v in cfg.items() if v is not None})
    if c.get("use_sliding_window"):
        raise UserError("Qwen2 with use_sliding_window is not supported")
    emb = require(ckpt, prefix + "embed_tokens.weight", "token embeddings")
    if len(emb.shape) != 2:
        raise CorruptFileError(f"{emb.name} must be 2-D, it has shape {list(emb.shape)}")
    n_vocab, n_embd = emb.shape
    layer_prefix = prefix + "layers."
    n_layer = count_layers(ckpt.names(), re.escape(layer_prefix) + r"(\d+)\.")
    if n_layer == 0:
        raise CorruptFileError(f"The checkpoint has no decoder layers under {layer_prefix!r}")
    if int(c.get("hidden_size", n_embd)) != n_embd:
        raise CorruptFileError(
            f"llm_config hidden_size {c['hidden_size']} does not match the embeddings' {n_embd}"
        )
    if int(c.get("num_hidden_layers", n_layer)) != n_layer:
        raise CorruptFileError(
            f"llm_config num_hidden_layers {c['num_hidden_layers']} but the checkpoint has "
            f"{n_layer}"
        )
    n_head = int(c["num_attention_heads"])
    n_head_kv = int(c.get("num_key_value_heads") or n_head)
    head_dim = int(c.get("head_dim") or n_embd // n_head)
    if head_dim % 2 or n_head % n_head_kv:
        raise CorruptFileError(f"unsupported attention shape: {n_head} heads of {head_dim}")
    theta, scaling = rope_settings(c)
    tied = lm_head not in ckpt
    if tied and not c.get("tie_word_embeddings", False):
        raise CorruptFileError(f"The checkpoint has no output head ({lm_head})")
    jobs: list[TensorJob] = [job("token_embd.weight", emb)]
    n_ff = 0
    for i in range(n_layer):
        p = f"{layer_prefix}{i}."

        def g(suffix: str, what: str, _p: str = p, _i: int = i) -> TensorRef:
            return require(ckpt, _p + suffix, f"layer {_i} {what}")

        b = f"blk.{i}."
        gate = g("mlp.gate_proj.weight", "MLP gate")
        n_ff = int(gate.shape[0])
        for hf, gg, shape in (
            ("self_attn.q_proj", "attn_q", (n_head * head_dim, n_embd)),
            ("self_attn.k_proj", "attn_k", (n_head_kv * head_dim, n_embd)),
            ("self_attn.v_proj", "attn_v", (n_head_kv * head_dim, n_embd)),
        ):
            w = g(hf + ".weight", hf)
            expect_shape(w, shape, hf)
            bias = g(hf + ".bias", hf + " bias")
            expect_shape(bias, (shape[0],), hf + " bias")
            jobs += [job(b + gg + ".weight", w), job(b + gg + ".bias", bias)]
        o = g("self_attn.o_proj.weight", "attention output")
        expect_shape(o, (n_embd, n_head * head_dim), "attention output")
        up = g("mlp.up_proj.weight", "MLP up")
        down = g("mlp.down_proj.weight", "MLP down")
        expect_shape(gate, (n_ff, n_embd), "MLP gate")
        expect_shape(up, (n_ff, n_embd), "MLP up")
        expect_shape(down, (n_embd, n_ff), "MLP down")
        jobs += [
            job(b + "attn_norm.weight", g("input_layernorm.weight", "attention norm")),
            job(b + "attn_output.weight", o),
            job(b + "ffn_norm.weight", g("post_attention_layernorm.weight", "MLP norm")),
            job(b + "ffn_gate.weight", gate),
            job(b + "ffn_down.weight", down),
            job(b + "ffn_up.weight", up),
        ]
    jobs.append(job("output_norm.weight", require(ckpt, prefix + "norm.weight", "final norm")))
    if not tied:
        head = ckpt[lm_head]
        expect_shape(head, (n_vocab, n_embd), "output head")
        jobs.append(job("output.weight", head))
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
        tied_embeddings=tied,
        base_arch="qwen2",
        gguf_arch="qwen2",
    )
    return hp, jobs


def _merge_text(m: Any) -> str:
    if isinstance(m, str):
        return m
    if isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
        return f"{m[0]} {m[1]}"
    raise CorruptFileError(f"tokenizer.json has a malformed merge {m!r}")


def _slow_files(folder: Path) -> dict[str, Any]:
    """``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``'s added tokens, in
    tokenizer.json's shape (a checkpoint saved without the fast tokenizer)."""
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not vocab_path.is_file() or not merges_path.is_file():
        raise UserError(
            f"No tokenizer in {folder}: expected tokenizer.json, or vocab.json + merges.txt "
            "(Qwen2 byte-level BPE)"
        )
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"Cannot read {merges_path}: {exc}") from exc
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    added = []
    decoder = read_json_opt(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
    for key, entry in decoder.items():
        if str(key).isdigit() and isinstance(entry, dict):
            added.append({**entry, "id": int(key)})
    return {
        "model": {"type": "BPE", "vocab": read_json_opt(vocab_path), "merges": merges},
        "added_tokens": added,
    }


def load_bpe_vocab(
    folder: Path, *, vocab_size: int, config: dict[str, Any], default_template: str
) -> Vocab:
    """A byte-level BPE ``tokenizer.json`` (Qwen2's) as a ``gpt2``/``qwen2`` GGUF vocabulary
    of exactly ``vocab_size`` entries (rows past the tokenizer are ``[PAD{i}]``, unused)."""
    tj_path = folder / "tokenizer.json"
    if tj_path.is_file():
        tj = read_json_opt(tj_path)
    else:
        tj = _slow_files(folder)
        tj_path = folder / "vocab.json"
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UserError(f"{tj_path} is not a byte-level BPE tokenizer (Qwen2's)")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for text, tid in model["vocab"].items():
        if not isinstance(tid, int) or not 0 <= tid < vocab_size:
            raise UserError(
                f"{tj_path}: token {text!r} has id {tid}, outside the model's {vocab_size} rows"
            )
        tokens[tid], types[tid] = text, NORMAL
    for entry in tj.get("added_tokens") or []:
        tid, text = entry.get("id"), entry.get("content")
        if not isinstance(tid, int) or not isinstance(text, str) or not 0 <= tid < vocab_size:
            raise UserError(f"{tj_path}: added token {entry!r} is outside the vocabulary")
        tokens[tid] = text
        types[tid] = CONTROL if entry.get("special") else USER_DEFINED
    merges = [_merge_text(m) for m in model.get("merges") or []]
    tcfg = read_json_opt(folder / "tokenizer_config.json")
    index = {t: i for i, t in enumerate(tokens)}

    def special(kind: str) -> int | None:
        tok = tcfg.get(f"{kind}_token")
        if isinstance(tok, dict):
            tok = tok.get("content")
        if isinstance(tok, str) and tok in index:
            return index[tok]
        cid = config.get(f"{kind}_token_id")
        return cid if isinstance(cid, int) and 0 <= cid < vocab_size else None

    vocab = Vocab(
        tokens=tokens,
        scores=[0.0] * vocab_size,
        types=types,
        bos_id=special("bos"),
        eos_id=special("eos"),
        unk_id=None,
        pad_id=special("pad"),
        add_bos=bool(tcfg.get("add_bos_token", False)),
        add_eos=False,
        model="gpt2",
        pre="qwen2",
        merges=merges,
    )
    own = find_chat_template([folder])
    if own:
        vocab.chat_template, vocab.template_source = own, "checkpoint"
    else:
        vocab.chat_template, vocab.template_source = default_template, "family default"
    return vocab
