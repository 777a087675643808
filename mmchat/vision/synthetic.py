"""Synthetic LLaVA vision towers: random weights, mmproj writing, and a numpy reference.

Used by the unit tests and ``benchmarks/vision.py``; also handy for checking a build of
libmmvision without downloading anything::

    spec = ClipSpec()                        # tiny by default; ClipSpec.vit_l_336() for real size
    w = random_weights(spec, seed=0)
    write_mmproj("tiny.gguf", spec, w, layout="mmchat", weight_type="f32")
    ref = reference_embeddings(spec, w, pixels)   # float64 numpy, transformers' semantics

Weights are kept in torch layout ([out, in]) under the tensor names mmchat's converter writes
(``v.blk.N.ffn_up`` = CLIP ``mlp.fc1``). ``layout="legacy"`` writes what llama.cpp's legacy
``convert_image_encoder_to_gguf.py`` produced for the published LLaVA/BakLLaVA mmproj files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipSpec:
    """Shape of a CLIP ViT tower + LLaVA projector."""

    image_size: int = 32
    patch_size: int = 8
    hidden: int = 32
    n_ff: int = 64
    n_layer: int = 3  # blocks of the full tower; LLaVA uses hidden_states[-2]
    n_head: int = 4
    proj_hidden: int = 48  # mm.0 output width
    n_embd_out: int = 40  # mm.2 output width = the LLM's n_embd
    projector: str = "mlp"  # or "mlp_norm"
    use_gelu: bool = False
    eps: float = 1e-5
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    feature_layers: tuple[int, ...] = field(default=())  # () = LLaVA's layer -2

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    @property
    def resolved_feature_layers(self) -> tuple[int, ...]:
        """Non-negative hidden_states indices (hidden_states[i] = output of block i-1)."""
        return self.feature_layers or (self.n_layer - 1,)

    @classmethod
    def vit_l_336(cls, n_embd_out: int = 4096) -> ClipSpec:
        """openai/clip-vit-large-patch14-336 + LLaVA-1.5-7B's projector."""
        return cls(
            image_size=336,
            patch_size=14,
            hidden=1024,
            n_ff=4096,
            n_layer=24,
            n_head=16,
            proj_hidden=n_embd_out,
            n_embd_out=n_embd_out,
        )


Weights = dict[str, np.ndarray]


def random_weights(spec: ClipSpec, seed: int = 0) -> Weights:
    """Random float32 weights, scaled so activations stay O(1) through every block."""
    rng = np.random.default_rng(seed)
    h, f, p = spec.hidden, spec.n_ff, spec.patch_size

    def mat(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def vec(n: int, scale: float = 0.1, centre: float = 0.0) -> np.ndarray:
        return (centre + scale * rng.standard_normal(n)).astype(np.float32)

    w: Weights = {
        "v.patch_embd.weight": (rng.standard_normal((h, 3, p, p)) / np.sqrt(3 * p * p)).astype(
            np.float32
        ),
        "v.class_embd": vec(h, 0.5),
        "v.position_embd.weight": (0.3 * rng.standard_normal((spec.n_patches + 1, h))).astype(
            np.float32
        ),
        "v.pre_ln.weight": vec(h, 0.1, 1.0),
        "v.pre_ln.bias": vec(h),
    }
    for i in range(spec.n_layer):
        b = f"v.blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w[b + name + ".weight"] = mat(h, h)
            w[b + name + ".bias"] = vec(h)
        w[b + "ln1.weight"] = vec(h, 0.1, 1.0)
        w[b + "ln1.bias"] = vec(h)
        w[b + "ln2.weight"] = vec(h, 0.1, 1.0)
        w[b + "ln2.bias"] = vec(h)
        w[b + "ffn_up.weight"] = mat(f, h)  # fc1
        w[b + "ffn_up.bias"] = vec(f)
        w[b + "ffn_down.weight"] = mat(h, f)  # fc2
        w[b + "ffn_down.bias"] = vec(h)
    w["v.post_ln.weight"] = vec(h, 0.1, 1.0)
    w["v.post_ln.bias"] = vec(h)
    n_in = h * len(spec.resolved_feature_layers)
    w["mm.0.weight"] = mat(spec.proj_hidden, n_in)
    w["mm.0.bias"] = vec(spec.proj_hidden)
    if spec.projector == "mlp":
        w["mm.2.weight"] = mat(spec.n_embd_out, spec.proj_hidden)
        w["mm.2.bias"] = vec(spec.n_embd_out)
    elif spec.projector == "mlp_norm":
        w["mm.1.weight"] = vec(spec.proj_hidden, 0.1, 1.0)
        w["mm.1.bias"] = vec(spec.proj_hidden)
        w["mm.3.weight"] = mat(spec.n_embd_out, spec.proj_hidden)
        w["mm.3.bias"] = vec(spec.n_embd_out)
        w["mm.4.weight"] = vec(spec.n_embd_out, 0.1, 1.0)
        w["mm.4.bias"] = vec(spec.n_embd_out)
    else:
        raise ValueError(f"unknown projector {spec.projector!r}")
    return w


def _store(writer: Any, name: str, data: np.ndarray, weight_type: str) -> None:
    """Add one tensor: 1-D as f32, the patch kernel as f32/f16, 2-D weights as ``weight_type``
    (the position embedding and rows not divisible by the block size fall back to f16)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if weight_type not in ("f32", "f16", "bf16", "q8_0"):
        raise ValueError(f"weight_type {weight_type!r}: use f32, f16, bf16 or q8_0")
    if data.ndim == 1 or weight_type == "f32":
        writer.add_tensor(name, data.astype(np.float32))
        return
    if data.ndim != 2 or weight_type == "f16" or name.startswith("v.position"):
        writer.add_tensor(name, data.astype(np.float16))
        return
    if weight_type == "q8_0" and data.shape[-1] % 32 != 0:
        writer.add_tensor(name, data.astype(np.float16))
        return
    qtype = GGMLQuantizationType.BF16 if weight_type == "bf16" else GGMLQuantizationType.Q8_0
    writer.add_tensor(name, quantize(data.astype(np.float32), qtype), raw_dtype=qtype)


def write_mmproj(
    path: str | Path,
    spec: ClipSpec,
    weights: Weights,
    *,
    layout: str = "mmchat",
    weight_type: str = "f32",
) -> Path:
    """Write an mmproj GGUF. ``layout``: "mmchat" (our converter's) or "legacy" (published)."""
    from gguf import GGUFWriter

    path = Path(path)
    if layout not in ("mmchat", "legacy"):
        raise ValueError(f"layout {layout!r}: use 'mmchat' or 'legacy'")
    legacy = layout == "legacy"
    feature = spec.resolved_feature_layers
    n_blocks = max(feature) if legacy else spec.n_layer
    w = GGUFWriter(str(path), arch="clip")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", spec.projector)
    if legacy:
        w.add_bool("clip.has_text_encoder", False)
        w.add_bool("clip.has_llava_projector", True)
        w.add_description("image encoder for LLaVA")
    w.add_uint32("clip.vision.image_size", spec.image_size)
    w.add_uint32("clip.vision.patch_size", spec.patch_size)
    w.add_uint32("clip.vision.embedding_length", spec.hidden)
    w.add_uint32("clip.vision.feed_forward_length", spec.n_ff)
    w.add_uint32("clip.vision.projection_dim", spec.n_embd_out)
    w.add_uint32("clip.vision.attention.head_count", spec.n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", spec.eps)
    w.add_uint32("clip.vision.block_count", n_blocks)
    w.add_array("clip.vision.image_mean", [float(x) for x in spec.image_mean])
    w.add_array("clip.vision.image_std", [float(x) for x in spec.image_std])
    w.add_bool("clip.use_gelu", spec.use_gelu)
    if not legacy or spec.feature_layers:
        w.add_array("clip.vision.feature_layer", [int(x) for x in feature])

    for name, data in weights.items():
        out_name = name
        if name.startswith("v.post_ln"):
            continue  # LLaVA never applies it; both layouts omit it
        if name.startswith("v.blk."):
            block = int(name.split(".")[2])
            if block >= n_blocks:
                continue
            if legacy:
                # the legacy renaming maps mlp.fc1 -> ffn_down and mlp.fc2 -> ffn_up
                if ".ffn_up." in name:
                    out_name = name.replace(".ffn_up.", ".ffn_down.")
                elif ".ffn_down." in name:
                    out_name = name.replace(".ffn_down.", ".ffn_up.")
        wt = weight_type
        if legacy and weight_type == "f32":
            wt = "f16"  # the published files store 2-D weights and the patch kernel as f16
        _store(w, out_name, data, wt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ----------------------------------------------------------------------------------------
# numpy reference (float64), transformers' CLIPVisionModel + LLaVA projector semantics


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    from math import erf, sqrt

    verf = np.vectorize(erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + verf(x / sqrt(2.0)))


def _quick_gelu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-1.702 * x))


def reference_embeddings(spec: ClipSpec, weights: Weights, pixels: np.ndarray) -> np.ndarray:
    """[n, 3, S, S] normalised pixels -> [n, n_patches, n_embd_out] image embeddings."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    px = np.asarray(pixels, dtype=np.float64)
    if px.ndim == 3:
        px = px[None]
    n, g, p, h = px.shape[0], spec.grid, spec.patch_size, spec.hidden
    patches = px.reshape(n, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
    x = patches @ w["v.patch_embd.weight"].reshape(h, -1).T
    cls = np.broadcast_to(w["v.class_embd"], (n, 1, h))
    x = np.concatenate([cls, x], axis=1) + w["v.position_embd.weight"][None]
    x = _layer_norm(x, w["v.pre_ln.weight"], w["v.pre_ln.bias"], spec.eps)
    hidden_states = [x]
    nh, dh = spec.n_head, h // spec.n_head
    act = _gelu_erf if spec.use_gelu else _quick_gelu
    for i in range(max(spec.resolved_feature_layers)):
        b = f"v.blk.{i}."

        def lin(t: np.ndarray, name: str, b: str = b) -> np.ndarray:
            return t @ w[b + name + ".weight"].T + w[b + name + ".bias"]

        y = _layer_norm(x, w[b + "ln1.weight"], w[b + "ln1.bias"], spec.eps)
        q = lin(y, "attn_q").reshape(n, -1, nh, dh).transpose(0, 2, 1, 3)
        k = lin(y, "attn_k").reshape(n, -1, nh, dh).transpose(0, 2, 1, 3)
        v = lin(y, "attn_v").reshape(n, -1, nh, dh).transpose(0, 2, 1, 3)
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(0, 2, 1, 3).reshape(n, -1, h)
        x = x + lin(a, "attn_out")
        y = _layer_norm(x, w[b + "ln2.weight"], w[b + "ln2.bias"], spec.eps)
        x = x + lin(act(lin(y, "ffn_up")), "ffn_down")
        hidden_states.append(x)
    feats = np.concatenate([hidden_states[i] for i in sorted(spec.resolved_feature_layers)], -1)
    feats = feats[:, 1:]
    e = feats @ w["mm.0.weight"].T + w["mm.0.bias"]
    if spec.projector == "mlp_norm":
        e = _layer_norm(e, w["mm.1.weight"], w["mm.1.bias"], spec.eps)
        e = _gelu_erf(e)
        e = e @ w["mm.3.weight"].T + w["mm.3.bias"]
        return _layer_norm(e, w["mm.4.weight"], w["mm.4.bias"], spec.eps)
    e = _gelu_erf(e)
    return e @ w["mm.2.weight"].T + w["mm.2.bias"]


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L2 error of ``a`` against the reference ``b``."""
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))
