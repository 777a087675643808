"""The per-tensor type policy of `mmchat convert` against llama.cpp's known results, and
ggml's quantizers reached through ctypes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from mmchat.converters import quant as Q

from mmchat.errors import UserError


def llama7b_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of Llama-2-7B / LLaVA-1.5-7B's language model."""
    d, ff, vocab = 4096, 11008, 32000
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (vocab, d))]
    for i in range(32):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (d,)),
            (b + "attn_q.weight", (d, d)),
            (b + "attn_k.weight", (d, d)),
            (b + "attn_v.weight", (d, d)),
            (b + "attn_output.weight", (d, d)),
            (b + "ffn_norm.weight", (d,)),
            (b + "ffn_gate.weight", (ff, d)),
            (b + "ffn_down.weight", (d, ff)),
            (b + "ffn_up.weight", (ff, d)),
        ]
    out += [("output_norm.weight", (d,)), ("output.weight", (vocab, d))]
    return out


def type_counts(quant: str) -> dict[str, int]:
    q = Q.parse_text_quant(quant)
    return dict(
        Counter(
            Q.text_tensor_type(q, n, s, n_layer=32, n_gqa=1, tied_output=False).name
            for n, s in llama7b_shapes()
        )
    )


# What llama.cpp's llama-quantize reports for Llama-2-7B ("llama_model_loader: - type ...").
@pytest.mark.parametrize(
    ("quant", "expected"),
    [
        ("q4_k_m", {"F32": 65, "Q4_K": 193, "Q6_K": 33}),
        ("q4_k_s", {"F32": 65, "Q4_K": 217, "Q5_K": 8, "Q6_K": 1}),
        ("q5_k_m", {"F32": 65, "Q5_K": 193, "Q6_K": 33}),
        ("q5_k_s", {"F32": 65, "Q5_K": 225, "Q6_K": 1}),
        ("q3_k_m", {"F32": 65, "Q3_K": 129, "Q4_K": 92, "Q5_K": 4, "Q6_K": 1}),
        ("q6_k", {"F32": 65, "Q6_K": 226}),
        ("q8_0", {"F32": 65, "Q8_0": 226}),
        ("q4_0", {"F32": 65, "Q4_0": 225, "Q6_K": 1}),
        ("f16", {"F32": 65, "F16": 226}),
        ("f32", {"F32": 291}),
    ],
)
def test_k_mix_policy_matches_llama_cpp_on_7b(quant: str, expected: dict[str, int]) -> None:
    assert type_counts(quant) == expected


def test_q4_k_m_layers_with_more_bits() -> None:
    q = Q.parse_text_quant("q4_k_m")
    six = [
        i
        for i in range(32)
        if Q.text_tensor_type(
            q, f"blk.{i}.attn_v.weight", (4096, 4096), n_layer=32, n_gqa=1, tied_output=False
        )
        == T.Q6_K
    ]
    assert six == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_shape_fallback_for_small_rows() -> None:
    q = Q.parse_text_quant("q4_k_m")

    def t(name: str, shape: tuple[int, ...]) -> T:
        return Q.text_tensor_type(q, name, shape, n_layer=2, n_gqa=1, tied_output=False)

    assert t("blk.0.attn_q.weight", (64, 64)) == T.Q5_0  # Q4_K needs rows of 256
    assert t("blk.0.attn_v.weight", (64, 64)) == T.Q5_0  # layer 0 of 2: no more bits
    assert t("blk.1.attn_v.weight", (64, 64)) == T.Q8_0  # last layer: Q6_K -> Q8_0
    assert t("blk.1.ffn_up.weight", (160, 48)) == T.F16  # 48 is not a multiple of 32
    assert t("output.weight", (576, 64)) == T.Q8_0  # not a multiple of 256 -> Q8_0
    assert t("token_embd.weight", (576, 512)) == T.Q4_K
    assert t("blk.0.attn_norm.weight", (64,)) == T.F32
    # T5's relative-position bucket biases are never quantized (llama.cpp's rule)
    assert t("enc.blk.0.attn_rel_b.weight", (32, 64)) == T.F32
    assert t("dec.blk.0.attn_rel_b.weight", (32, 64)) == T.F32
    q2 = Q.parse_text_quant("q2_k")
    assert (
        Q.text_tensor_type(
            q2, "blk.0.attn_v.weight", (64, 64), n_layer=2, n_gqa=4, tied_output=False
        )
        == T.Q5_0
    )
    assert (
        Q.text_tensor_type(
            q2, "blk.0.attn_q.weight", (64, 64), n_layer=2, n_gqa=4, tied_output=False
        )
        == T.Q4_0
    )


def test_tied_embeddings_follow_the_output_rule() -> None:
    q = Q.parse_text_quant("q4_k_m")
    t = Q.text_tensor_type(
        q, "token_embd.weight", (32000, 4096), n_layer=32, n_gqa=1, tied_output=True
    )
    assert t == T.Q6_K


def test_vision_policy_keeps_embeddings_and_norms() -> None:
    vq = Q.parse_vision_quant("q8_0")
    assert Q.vision_tensor_type(vq, "v.blk.0.attn_q.weight", (1024, 1024)) == T.Q8_0
    assert Q.vision_tensor_type(vq, "mm.0.weight", (4096, 1024)) == T.Q8_0
    assert Q.vision_tensor_type(vq, "v.blk.0.attn_q.bias", (1024,)) == T.F32
    assert Q.vision_tensor_type(vq, "v.blk.0.ln1.weight", (1024,)) == T.F32
    assert Q.vision_tensor_type(vq, "v.class_embd", (1024,)) == T.F32
    assert Q.vision_tensor_type(vq, "v.patch_embd.weight", (1024, 3, 14, 14)) == T.F16
    assert Q.vision_tensor_type(vq, "v.position_embd.weight", (577, 1024)) == T.F16
    assert Q.vision_tensor_type(vq, "v.blk.0.ffn_up.weight", (128, 48)) == T.F16
    k = Q.parse_vision_quant("q4_k")
    assert Q.vision_tensor_type(k, "v.blk.0.ffn_up.weight", (4096, 1024)) == T.Q4_K
    assert Q.vision_tensor_type(k, "v.blk.0.ffn_up.weight", (128, 64)) == T.Q5_0
    f32 = Q.parse_vision_quant("f32")
    assert Q.vision_tensor_type(f32, "v.patch_embd.weight", (1024, 3, 14, 14)) == T.F32


def test_unknown_quant_names_list_the_choices() -> None:
    with pytest.raises(UserError, match="q4_k_m") as exc:
        Q.parse_text_quant("q4_k_x")
    assert "f16" in str(exc.value)
    with pytest.raises(UserError, match="--vision-quant"):
        Q.parse_vision_quant("q4_k_m")


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_K, T.Q6_K, T.Q5_0, T.Q4_0, T.Q5_K, T.Q3_K, T.Q2_K])
def test_ggml_quantizers_round_trip(t: T) -> None:
    """ggml's own quantizers (ctypes, threaded) produce blocks gguf-py decodes back."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 512)).astype(np.float32)
    with ThreadPoolExecutor(2) as pool:
        threaded = Q.encode(x, t, pool=pool)
    single = Q.encode(x, t)
    assert threaded.tobytes() == single.tobytes()
    assert threaded.nbytes == Q.nbytes_for(t, x.shape)
    back = dequantize(threaded, t).reshape(x.shape)
    rel = np.linalg.norm(back - x) / np.linalg.norm(x)
    limit = {T.Q8_0: 0.01, T.Q6_K: 0.02, T.Q5_K: 0.04, T.Q5_0: 0.05, T.Q4_K: 0.08}.get(t, 0.3)
    assert rel < limit


def test_float_encodings() -> None:
    x = np.array([[1.0, 1e-8, 65504.0, -2.5]], dtype=np.float32)
    assert Q.encode(x, T.F32).tobytes() == x.tobytes()
    assert np.array_equal(Q.encode(x, T.F16), x.astype(np.float16))
    bf = dequantize(Q.encode(x, T.BF16), T.BF16).reshape(x.shape)
    assert np.allclose(bf, x, rtol=1e-2)
