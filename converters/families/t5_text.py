"""A Flan-T5 language model (BLIP-2 / InstructBLIP ``text_config.model_type == "t5"``) as
llama.cpp's ``t5`` architecture: tensors, hyper-parameters, the Unigram vocabulary and the
prompt formats the two families were trained with.

Tensor names follow gguf-py's T5 map (``enc.blk.N.*``, ``dec.blk.N.*``, ``token_embd``,
``output``). What llama.cpp's T5 graph computes and the mapping relies on:

- gated FFN ``act(wi_0 x) * wi_1 x`` → ``ffn_gate`` = ``wi_0``, ``ffn_up`` = ``wi_1``; ggml's
  GELU there is the tanh form. BLIP-2's and InstructBLIP's T5 (Hugging Face and LAVIS) use the
  exact GELU (``dense_act_fn="gelu"``): a small, measured difference (docs/vision-gguf.md);
- relative position buckets with ``max_distance`` 128 (hard-coded in llama.cpp), the bias
  table of layer 0 shared by all layers;
- no scaling of the decoder output: where transformers scales it by ``d_model ** -0.5``
  (tied embeddings of the original T5), the scale is folded into ``output.weight``.

The vocabulary is ``spiece.model`` (SentencePiece Unigram) written as tokenizer model ``t5``
with its scores and precompiled normalisation charsmap (llama.cpp's UGM tokenizer).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import Checkpoint, TensorRef
from ..tokenizer import (
    Vocab,
    load_vocab,
    read_sentencepiece_normalizer,
    unigram_normalizer_of_tokenizer_json,
)
from .base import TensorJob, TextHParams, count_layers, expect_shape, job, require

REL_BIAS = "0.SelfAttention.relative_attention_bias.weight"  # in block 0 only
# llama.cpp's llama_relative_position_bucket uses this maximum distance
LLAMA_MAX_DISTANCE = 128

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
# The encoder input. BLIP-2 + T5: "<query rows>Question: {q} Answer:</s>" (T5's tokenizer
# appends </s>; later turns: " {a} Question: … Answer:" before it); an image without a
# question is "<query rows></s>", LAVIS' captioning input (its empty prompt). InstructBLIP + T5:
# "<query rows>{instruction}</s>", turns joined by a space. No BOS (T5 has none); the
# decoder starts from decoder_start_token_id.
BLIP2_T5_TEMPLATE = (
    "{%- for message in messages -%}" + _PARTS + "{{- '<image>' * n_images -}}"
    "{%- if not loop.first and message['role'] != 'assistant' -%}{{- ' ' -}}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{- text -}}"
    "{%- elif message['role'] == 'user' and text -%}{{- 'Question: ' + text + ' Answer:' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- ' ' + text -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- eos_token -}}{%- endif -%}"
)
INSTRUCTBLIP_T5_TEMPLATE = (
    "{%- for message in messages -%}" + _PARTS + "{{- '<image>' * n_images -}}"
    "{%- if not loop.first -%}{{- ' ' -}}{%- endif -%}"
    "{{- text -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- eos_token -}}{%- endif -%}"
)

# FFN activations: what llama.cpp computes, and whether it is exactly the checkpoint's
_GATED = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True}


def t5_text_plan(
    ckpt: Checkpoint, tcfg: dict[str, Any], *, prefix: str, notes: list[str]
) -> tuple[TextHParams, list[TensorJob], list[tuple[str, Any]]]:
    """Hyper-parameters, tensor jobs and the ``t5.*`` metadata of the T5 under ``prefix``
    (``language_model.`` in transformers' BLIP-2 / InstructBLIP)."""
    names = ckpt.names()
    n_enc = count_layers(names, re.escape(prefix) + r"encoder\.block\.(\d+)\.")
    n_dec = count_layers(names, re.escape(prefix) + r"decoder\.block\.(\d+)\.")
    if not n_enc or not n_dec:
        raise CorruptFileError(f"No T5 encoder/decoder blocks found under {prefix!r}")
    for key, n in (("num_layers", n_enc), ("num_decoder_layers", n_dec)):
        if int(tcfg.get(key, n) or n) != n:
            raise CorruptFileError(f"text config {key} {tcfg.get(key)} but the checkpoint has {n}")
    d = int(tcfg.get("d_model", 0))
    d_kv = int(tcfg.get("d_kv", 0))
    d_ff = int(tcfg.get("d_ff", 0))
    n_head = int(tcfg.get("num_heads", 0))
    if min(d, d_kv, d_ff, n_head) <= 0:
        raise CorruptFileError("text config lacks d_model / d_kv / d_ff / num_heads")
    n_buckets = int(tcfg.get("relative_attention_num_buckets", 32))
    max_dist = int(tcfg.get("relative_attention_max_distance", LLAMA_MAX_DISTANCE))
    if max_dist != LLAMA_MAX_DISTANCE:
        raise UserError(
            f"T5 relative_attention_max_distance {max_dist}: llama.cpp computes the position "
            f"buckets with {LLAMA_MAX_DISTANCE} only"
        )
    proj = str(tcfg.get("feed_forward_proj", "relu"))
    gated = proj.startswith("gated-")
    act = str(tcfg.get("dense_act_fn") or proj.split("-")[-1])
    if gated and act not in _GATED:
        raise UserError(f"T5 feed_forward_proj {proj!r} ({act}): llama.cpp's T5 has gated GELU")
    if not gated and proj != "relu":
        raise UserError(f"T5 feed_forward_proj {proj!r}: llama.cpp's T5 has relu or gated-gelu")
    if gated and not _GATED[act]:
        notes.append(
            "T5 FFN: the checkpoint uses the exact GELU, llama.cpp's T5 the tanh GELU "
            "(a small difference in the logits; see docs/vision-gguf.md)"
        )

    def g(name: str, what: str) -> TensorRef:
        return require(ckpt, prefix + name, what)

    embed = next(
        (n for n in ("shared.weight", "encoder.embed_tokens.weight") if prefix + n in ckpt),
        None,
    )
    if embed is None:
        raise CorruptFileError(f"The checkpoint has no T5 token embeddings ({prefix}shared.weight)")
    tok = ckpt[prefix + embed]
    if len(tok.shape) != 2 or tok.shape[1] != d:
        raise CorruptFileError(f"{tok.name} has shape {list(tok.shape)}, expected [vocab, {d}]")
    n_vocab = int(tok.shape[0])
    jobs = [job("token_embd.weight", tok)]
    head = tok
    if prefix + "lm_head.weight" in ckpt:  # untied (Flan-T5)
        head = ckpt[prefix + "lm_head.weight"]
    expect_shape(head, (n_vocab, d), "T5 lm_head")
    # transformers 5 writes scale_decoder_outputs; older configs mean it by a tied embedding
    scale = tcfg.get("scale_decoder_outputs")
    if not isinstance(scale, bool):
        scale = tcfg.get("tie_word_embeddings", True) is not False
    if scale:
        factor = float(d) ** -0.5
        jobs.append(job("output.weight", head, lambda a: a * factor))
    else:
        jobs.append(job("output.weight", head))

    inner = n_head * d_kv

    def attn(src: str, dst: str, what: str) -> None:
        for k, name in (("q", "q"), ("k", "k"), ("v", "v")):
            w = g(f"{src}.{k}.weight", what)
            expect_shape(w, (inner, d), what)
            jobs.append(job(f"{dst}_{name}.weight", w))
        w = g(f"{src}.o.weight", what)
        expect_shape(w, (d, inner), what)
        jobs.append(job(f"{dst}_o.weight", w))

    def norm(src: str, dst: str, what: str) -> None:
        w = g(src, what)
        expect_shape(w, (d,), what)
        jobs.append(job(dst, w))

    def ffn(src: str, dst: str, what: str) -> None:
        pairs: tuple[tuple[str, str, tuple[int, int]], ...] = (("wi", "ffn_up", (d_ff, d)),)
        if gated:
            pairs = (("wi_0", "ffn_gate", (d_ff, d)), ("wi_1", "ffn_up", (d_ff, d)))
        for hf, gg, shape in (*pairs, ("wo", "ffn_down", (d, d_ff))):
            w = g(f"{src}.DenseReluDense.{hf}.weight", what)
            expect_shape(w, shape, what)
            jobs.append(job(f"{dst}.{gg}.weight", w))

    def rel_bias(src: str, dst: str, what: str) -> None:
        w = g(src, what)
        expect_shape(w, (n_buckets, n_head), what)
        jobs.append(job(dst, w))

    for i in range(n_enc):
        b, t = f"encoder.block.{i}.layer.", f"enc.blk.{i}."
        what = f"T5 encoder block {i}"
        norm(b + "0.layer_norm.weight", t + "attn_norm.weight", what)
        attn(b + "0.SelfAttention", t + "attn", what)
        if i == 0:
            rel_bias(b + REL_BIAS, t + "attn_rel_b.weight", what)
        norm(b + "1.layer_norm.weight", t + "ffn_norm.weight", what)
        ffn(b + "1", t[:-1], what)
    norm("encoder.final_layer_norm.weight", "enc.output_norm.weight", "T5 encoder final norm")
    for i in range(n_dec):
        b, t = f"decoder.block.{i}.layer.", f"dec.blk.{i}."
        what = f"T5 decoder block {i}"
        norm(b + "0.layer_norm.weight", t + "attn_norm.weight", what)
        attn(b + "0.SelfAttention", t + "attn", what)
        if i == 0:
            rel_bias(b + REL_BIAS, t + "attn_rel_b.weight", what)
        norm(b + "1.layer_norm.weight", t + "cross_attn_norm.weight", what)
        attn(b + "1.EncDecAttention", t + "cross_attn", what)
        norm(b + "2.layer_norm.weight", t + "ffn_norm.weight", what)
        ffn(b + "2", t[:-1], what)
    norm("decoder.final_layer_norm.weight", "dec.output_norm.weight", "T5 decoder final norm")

    start = tcfg.get("decoder_start_token_id")
    if not isinstance(start, int):
        start = int(tcfg.get("pad_token_id", 0) or 0)
    hp = TextHParams(
        n_vocab=n_vocab,
        n_embd=d,
        n_ff=d_ff,
        n_layer=n_enc,
        n_head=n_head,
        n_head_kv=n_head,
        head_dim=d_kv,
        n_ctx=int(tcfg.get("n_positions", 512) or 512),
        rms_eps=float(tcfg.get("layer_norm_epsilon", 1e-6)),
        rope_theta=10000.0,  # written by the pipeline, unused by T5
        gguf_arch="t5",
    )
    kv: list[tuple[str, Any]] = [
        ("t5.attention.relative_buckets_count", n_buckets),
        ("t5.decoder_start_token_id", int(start)),
        ("t5.decoder_block_count", n_dec),
    ]
    return hp, jobs, kv


def t5_vocab(
    folder: Path, *, vocab_size: int, config_ids: dict[str, int | None], template: str
) -> tuple[Vocab, bool, list[tuple[str, Any]]]:
    """The Unigram vocabulary of ``folder/spiece.model`` (or, without one, of its Unigram
    ``tokenizer.json``; + added tokens such as ``<image>``) for llama.cpp's ``t5``
    tokenizer: the vocabulary, ``add_space_prefix`` and the extra tokenizer metadata
    (scores, charsmap, whitespace rule)."""
    spm = folder / "spiece.model"
    if not spm.is_file():
        spm = folder / "tokenizer.model"
    if spm.is_file():
        norm = read_sentencepiece_normalizer(spm)
    elif (folder / "tokenizer.json").is_file():  # transformers 5 saves no spiece.model
        spm = folder / "tokenizer.json"
        norm = unigram_normalizer_of_tokenizer_json(spm)
    else:
        raise UserError(
            f"{folder} has no spiece.model or tokenizer.json: the Flan-T5 vocabulary is read "
            "from its SentencePiece model"
        )
    if not norm.unigram:
        raise UserError(f"{spm.name} is not a Unigram SentencePiece model (T5's tokenizer)")
    vocab = load_vocab(
        folder, vocab_size=vocab_size, config_ids=config_ids, default_template=template
    )
    vocab.model = "t5"
    vocab.pre = "default"
    vocab.bos_id = None  # T5 has no BOS (its configs name </s> as bos_token_id)
    vocab.add_bos = False
    vocab.add_eos = True  # T5's tokenizer appends </s>; the templates write it themselves
    kv: list[tuple[str, Any]] = [
        ("tokenizer.ggml.scores", [float(x) for x in vocab.scores]),
        ("tokenizer.ggml.remove_extra_whitespaces", norm.remove_extra_whitespaces),
    ]
    if norm.precompiled_charsmap:
        kv.append(("tokenizer.ggml.precompiled_charsmap", norm.precompiled_charsmap))
    return vocab, norm.add_dummy_prefix, kv
