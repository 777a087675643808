"""OpenFlamingo's base language models in the text GGUF: GPT-NeoX (RedPajama-INCITE, llama.cpp's
``gptneox`` names) and MPT (transformers' ``MptForCausalLM`` names = mosaicml/mpt-7b's, and the
older MosaicGPT names of mosaicml/mpt-1b-redpajama-200b; llama.cpp's ``mpt`` names); fused QKV
projections are split into Q, K, V. The tensors come from the base
folder's weights with ``checkpoint.pt``'s ``lang_encoder.*`` tensors laid over them (``refs``).
Layout: docs/openflamingo-gguf.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import TensorRef
from .base import TensorJob, TextHParams, expect_shape, job
from .openflamingo_parts import rows_of, split_rows

BASES = ("gpt_neox", "mpt", "mosaic_gpt")
LAYERS = {"gpt_neox": "gpt_neox.layers", "mpt": "transformer.blocks"}
"""Where open_flamingo's FlamingoLayers sit (its decoder_layers_attr_name)."""


@dataclass
class BaseLM:
    hp: TextHParams
    jobs: list[TensorJob]
    kv: list[tuple[str, Any]] = field(default_factory=list)  # text GGUF keys of the base
    embed_in: str = ""  # the input embedding's name (resized by open_flamingo)
    embed_out: str | None = None  # the output head's, None when tied


def _need(refs: dict[str, TensorRef], name: str, what: str) -> TensorRef:
    if name not in refs:
        raise CorruptFileError(f"The checkpoint has no tensor {name!r} ({what})")
    return refs[name]


def base_plan(refs: dict[str, TensorRef], cfg: dict[str, Any], llm: Path) -> BaseLM:
    kind = cfg.get("model_type")
    if kind == "gpt_neox":
        return _neox(refs, cfg, llm)
    if kind in ("mpt", "mosaic_gpt"):
        return _mpt(refs, cfg, llm)
    raise UserError(
        f"OpenFlamingo on a {kind!r} base ({llm.name}) is not supported: mmchat converts the "
        "GPT-NeoX (RedPajama-INCITE) and MPT (MPT-7B, MPT-1B's MosaicGPT) bases"
    )


def _ints(cfg: dict[str, Any], llm: Path, *keys: str) -> list[int]:
    try:
        return [int(cfg[k]) for k in keys]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"{llm / 'config.json'} lacks {exc}") from None


def _neox(refs: dict[str, TensorRef], cfg: dict[str, Any], llm: Path) -> BaseLM:
    """GPT-NeoX: LayerNorms and linears with bias, QKV rows ``[head][q|k|v][head_dim]``."""
    E, L, H = _ints(cfg, llm, "hidden_size", "num_hidden_layers", "num_attention_heads")
    F = int(cfg.get("intermediate_size") or 4 * E)
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
        ref = _need(refs, hf, "GPT-NeoX")
        expect_shape(ref, shape, gg)
        jobs.append(job(gg, ref))

    emb = _need(refs, "gpt_neox.embed_in.weight", "input embedding")
    put("token_embd.weight", "gpt_neox.embed_in.weight", emb.shape)
    put("output_norm.weight", "gpt_neox.final_layer_norm.weight", (E,))
    put("output_norm.bias", "gpt_neox.final_layer_norm.bias", (E,))
    if "embed_out.weight" not in refs:
        raise UserError("GPT-NeoX with tied input/output embeddings is not supported")
    put("output.weight", "embed_out.weight", refs["embed_out.weight"].shape)
    for i in range(L):
        p, b = f"gpt_neox.layers.{i}.", f"blk.{i}."
        for hf, gg in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            put(b + gg + ".weight", p + hf + ".weight", (E,))
            put(b + gg + ".bias", p + hf + ".bias", (E,))
        for kind, shape in (("weight", (3 * E, E)), ("bias", (3 * E,))):
            ref = _need(refs, p + "attention.query_key_value." + kind, f"layer {i} QKV")
            expect_shape(ref, shape, f"layer {i} QKV")
            for j, gg in enumerate(("attn_q", "attn_k", "attn_v")):
                jobs.append(_per_head_part(ref, j, H, D, b + gg + "." + kind))
        put(b + "attn_output.weight", p + "attention.dense.weight", (E, E))
        put(b + "attn_output.bias", p + "attention.dense.bias", (E,))
        put(b + "ffn_up.weight", p + "mlp.dense_h_to_4h.weight", (F, E))
        put(b + "ffn_up.bias", p + "mlp.dense_h_to_4h.bias", (F,))
        put(b + "ffn_down.weight", p + "mlp.dense_4h_to_h.weight", (E, F))
        put(b + "ffn_down.bias", p + "mlp.dense_4h_to_h.bias", (E,))
    hp = TextHParams(
        n_vocab=int(emb.shape[0]),
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
    kv: list[tuple[str, Any]] = [
        ("gptneox.use_parallel_residual", bool(cfg.get("use_parallel_residual", True)))
    ]
    return BaseLM(hp, jobs, kv, "gpt_neox.embed_in.weight", "embed_out.weight")


# MPT flavours: transformers' MptForCausalLM / mosaicml/mpt-7b ("mpt") and the older MosaicGPT
# remote code of mosaicml/mpt-1b-redpajama-200b ("mosaic_gpt"): module names and config keys
_MPT_NAMES = {
    "mpt": {
        "norm_1": "norm_1",
        "norm_2": "norm_2",
        "up": "ffn.up_proj",
        "down": "ffn.down_proj",
        "norm_f": "transformer.norm_f",
    },
    "mosaic_gpt": {
        "norm_1": "ln_1",
        "norm_2": "ln_2",
        "up": "mlp.mlp_up",
        "down": "mlp.mlp_down",
        "norm_f": "transformer.ln_f",
    },
}


def _mpt_attn(cfg: dict[str, Any], llm: Path) -> dict[str, Any]:
    """The attention settings of either flavour, in MptConfig.attn_config's names (MosaicGPT
    keeps them flat: alibi, alibi_bias_max, attn_qk_ln, attn_clip_qkv, softmax_scale)."""
    attn = cfg.get("attn_config") or {}
    if not isinstance(attn, dict):
        raise CorruptFileError(f"{llm / 'config.json'}: attn_config is not an object")
    flat = {
        "alibi": cfg.get("alibi"),
        "alibi_bias_max": cfg.get("alibi_bias_max"),
        "clip_qkv": cfg.get("attn_clip_qkv"),
        "qk_ln": cfg.get("attn_qk_ln"),
        "softmax_scale": cfg.get("softmax_scale"),
    }
    return {**{k: v for k, v in flat.items() if v is not None}, **attn}


def _mpt(refs: dict[str, TensorRef], cfg: dict[str, Any], llm: Path) -> BaseLM:
    """MPT: ALiBi, biases only where present (MPT-7B: none), QKV rows ``[q; k; v]``, optional
    LayerNorms over the whole Q and K (qk_ln), exact-GELU FFN, head tied to wte."""
    # by the names the weights use (a copy of MPT-1B may say model_type "mpt")
    flavour = "mosaic_gpt" if "transformer.blocks.0.ln_1.weight" in refs else "mpt"
    names = _MPT_NAMES[flavour]
    E, H, L = _ints(cfg, llm, "d_model", "n_heads", "n_layers")
    F = int(E * float(cfg.get("expansion_ratio", cfg.get("mlp_ratio", 4))))
    attn = _mpt_attn(cfg, llm)
    if not attn.get("alibi", flavour == "mpt"):  # transformers' MptAttentionConfig: True
        raise UserError("MPT without ALiBi (learned positions) is not supported")
    if attn.get("qk_gn"):
        raise UserError("MPT with qk_gn (GroupNorm on Q and K) is not supported")
    if flavour == "mosaic_gpt" and H & (H - 1):
        # its slopes are 2^-(8 i / H) for every head; ggml's (and MPT's) interleave them then
        raise UserError(f"MosaicGPT with {H} heads (not a power of two) is not supported")
    ffn = cfg.get("ffn_config") or {}
    if isinstance(ffn, dict) and ffn.get("ffn_type", "mptmlp") != "mptmlp":
        raise UserError("MPT with a non-default FFN is not supported")
    if E % H:
        raise CorruptFileError(f"d_model {E} is not a multiple of {H} heads")
    jobs: list[TensorJob] = []

    def put(gg: str, hf: str, shape: tuple[int, ...], required: bool = True) -> None:
        if not required and hf not in refs:
            return
        ref = _need(refs, hf, "MPT")
        expect_shape(ref, shape, gg)
        jobs.append(job(gg, ref))

    emb = _need(refs, "transformer.wte.weight", "input embedding")
    put("token_embd.weight", "transformer.wte.weight", emb.shape)
    put("output_norm.weight", names["norm_f"] + ".weight", (E,))
    put("output_norm.bias", names["norm_f"] + ".bias", (E,), False)
    head = "lm_head.weight" if "lm_head.weight" in refs else None
    if head and cfg.get("tie_word_embeddings", True):
        head = None  # tied: a saved copy; the model reads wte
    if head:
        put("output.weight", head, refs[head].shape)
    qk_ln = bool(attn.get("qk_ln"))
    for i in range(L):
        p, b = f"transformer.blocks.{i}.", f"blk.{i}."
        for hf, gg in ((names["norm_1"], "attn_norm"), (names["norm_2"], "ffn_norm")):
            put(b + gg + ".weight", p + hf + ".weight", (E,))
            put(b + gg + ".bias", p + hf + ".bias", (E,), False)
        for kind, shape in (("weight", (3 * E, E)), ("bias", (3 * E,))):
            name = p + "attn.Wqkv." + kind
            if kind == "bias" and name not in refs:
                continue
            ref = _need(refs, name, f"layer {i} Wqkv")
            expect_shape(ref, shape, f"layer {i} Wqkv")
            for piece, gg in zip(split_rows(ref, 3), ("attn_q", "attn_k", "attn_v"), strict=True):
                jobs.append(job(f"{b}{gg}.{kind}", piece))
        if qk_ln:
            for hf, gg in (("attn.q_ln", "attn_q_norm"), ("attn.k_ln", "attn_k_norm")):
                put(f"{b}{gg}.weight", f"{p}{hf}.weight", (E,))
                put(f"{b}{gg}.bias", f"{p}{hf}.bias", (E,), False)
        put(b + "attn_output.weight", p + "attn.out_proj.weight", (E, E))
        put(b + "attn_output.bias", p + "attn.out_proj.bias", (E,), False)
        put(b + "ffn_up.weight", p + names["up"] + ".weight", (F, E))
        put(b + "ffn_up.bias", p + names["up"] + ".bias", (F,), False)
        put(b + "ffn_down.weight", p + names["down"] + ".weight", (E, F))
        put(b + "ffn_down.bias", p + names["down"] + ".bias", (E,), False)
    hp = TextHParams(
        n_vocab=int(emb.shape[0]),
        n_embd=E,
        n_ff=F,
        n_layer=L,
        n_head=H,
        n_head_kv=H,
        head_dim=E // H,
        n_ctx=int(cfg.get("max_seq_len", 2048)),
        rms_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        rope_theta=10000.0,
        gguf_arch="mpt",
    )
    kv: list[tuple[str, Any]] = [
        ("mpt.attention.max_alibi_bias", float(attn.get("alibi_bias_max", 8)))
    ]
    if attn.get("clip_qkv"):
        kv.append(("mpt.attention.clamp_kqv", float(attn["clip_qkv"])))
    if attn.get("softmax_scale"):
        kv.append(("openflamingo.attention.scale", float(attn["softmax_scale"])))
    scale = cfg.get("logit_scale")
    if scale == "inv_sqrt_d_model":
        scale = E**-0.5
    if scale is not None:
        kv.append(("openflamingo.logit_scale", float(scale)))
    return BaseLM(hp, jobs, kv, "transformer.wte.weight", head)


def _per_head_part(ref: TensorRef, j: int, n_head: int, head_dim: int, name: str) -> TensorJob:
    """Part ``j`` of a QKV laid out per head, ``[head][q|k|v][head_dim]`` (GPT-NeoX)."""

    def load() -> Any:
        arr = ref.load().astype("float32")
        arr = arr.reshape(n_head, 3, head_dim, *arr.shape[1:])[:, j]
        return arr.reshape(n_head * head_dim, *arr.shape[2:]).copy()

    shape = (n_head * head_dim, *ref.shape[1:])
    return TensorJob(name, shape, ref.nbytes // 3, load)


def fit_vocab(lm: BaseLM, refs: dict[str, TensorRef], n_vocab: int) -> None:
    """Input and output embeddings of exactly ``n_vocab`` rows, as resize_token_embeddings
    leaves them: checkpoint.pt's (already resized) or the base's first rows."""
    sources = {"token_embd.weight": lm.embed_in, "output.weight": lm.embed_out}
    for k, jb in enumerate(lm.jobs):
        src = sources.get(jb.name)
        if src is None:
            continue
        ref = refs[src]
        if ref.shape[0] < n_vocab:
            raise UserError(
                f"{src} has {ref.shape[0]} rows but the tokenizer with OpenFlamingo's tokens has "
                f"{n_vocab}: checkpoint.pt must hold the resized embeddings"
            )
        if ref.shape[0] > n_vocab:
            ref = rows_of(ref, 0, n_vocab)
        expect_shape(ref, (n_vocab, lm.hp.n_embd), src)
        lm.jobs[k] = job(jb.name, ref)
    lm.hp.n_vocab = n_vocab
