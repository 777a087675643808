"""Converting NVLM-D-72B-shaped checkpoints: source MB/s and peak RSS against the layer count.

Writes bf16 safetensors checkpoints in NVLM-D's layout with the real 72B widths (InternViT-6B:
3200 wide, 25 heads + 7 zero dummy heads, FFN 12800; mlp1 12800 -> 29568 -> 8192; Qwen2-72B
layers: 8192 wide, 64 heads, 8 KV heads, FFN 29568) but only a few layers and a 4096-token
vocabulary (the embedding is one tensor whatever the depth), then runs ``mmchat convert``'s
``convert()`` on each in a fresh process and reports its peak RSS (``ru_maxrss``) and the
source bytes read per second. Peak RSS should not grow with the layer count: the converter
holds about two tensors at a time.

    python benchmarks/nvlm_convert_rss.py [--layers 1 3] [--quant q8_0] [--dir /tmp/nvlm72]

Needs ~12 GB of disk for the default layer counts (deleted afterwards unless --keep).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

V_D, V_HEADS, V_DUMMY, V_FF = 3200, 25, 7, 12800
T_D, T_HEADS, T_KV, T_FF, VOCAB = 8192, 64, 8, 29568, 4096
BLOCK = 1 << 24  # 16 Mi values of random bf16, reused for every large tensor


def _bf16(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def tensors(n_text: int, n_vision: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, fill) in file order; fill: "rand", "ones", "qkv" or "proj" (dummy-padded)."""
    dh = V_D // V_HEADS
    dp = (V_HEADS + V_DUMMY) * dh
    out: list[tuple[str, tuple[int, ...], str]] = [
        ("vision_model.embeddings.class_embedding", (1, 1, V_D), "rand"),
        ("vision_model.embeddings.patch_embedding.weight", (V_D, 3, 14, 14), "rand"),
        ("vision_model.embeddings.patch_embedding.bias", (V_D,), "rand"),
        ("vision_model.embeddings.position_embedding", (1, 1025, V_D), "rand"),
    ]
    for i in range(n_vision):
        p = f"vision_model.encoder.layers.{i}."
        out += [
            (p + "attn.qkv.weight", (3 * dp, V_D), "qkv"),
            (p + "attn.q_norm.weight", (dp,), "ones"),
            (p + "attn.k_norm.weight", (dp,), "ones"),
            (p + "attn.proj.weight", (V_D, dp), "proj"),
            (p + "attn.proj.bias", (V_D,), "rand"),
            (p + "mlp.fc1.weight", (V_FF, V_D), "rand"),
            (p + "mlp.fc1.bias", (V_FF,), "rand"),
            (p + "mlp.fc2.weight", (V_D, V_FF), "rand"),
            (p + "mlp.fc2.bias", (V_D,), "rand"),
            (p + "norm1.weight", (V_D,), "ones"),
            (p + "norm2.weight", (V_D,), "ones"),
            (p + "ls1", (V_D,), "rand"),
            (p + "ls2", (V_D,), "rand"),
        ]
    out += [
        ("mlp1.0.weight", (4 * V_D,), "ones"),
        ("mlp1.0.bias", (4 * V_D,), "rand"),
        ("mlp1.1.weight", (T_FF, 4 * V_D), "rand"),
        ("mlp1.3.weight", (T_D, T_FF), "rand"),
        ("language_model.model.embed_tokens.weight", (VOCAB, T_D), "rand"),
        ("language_model.model.norm.weight", (T_D,), "ones"),
        ("language_model.lm_head.weight", (VOCAB, T_D), "rand"),
    ]
    kv = T_KV * (T_D // T_HEADS)
    for i in range(n_text):
        p = f"language_model.model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (T_D, T_D), "rand"),
            (p + "self_attn.q_proj.bias", (T_D,), "rand"),
            (p + "self_attn.k_proj.weight", (kv, T_D), "rand"),
            (p + "self_attn.k_proj.bias", (kv,), "rand"),
            (p + "self_attn.v_proj.weight", (kv, T_D), "rand"),
            (p + "self_attn.v_proj.bias", (kv,), "rand"),
            (p + "self_attn.o_proj.weight", (T_D, T_D), "rand"),
            (p + "mlp.gate_proj.weight", (T_FF, T_D), "rand"),
            (p + "mlp.up_proj.weight", (T_FF, T_D), "rand"),
            (p + "mlp.down_proj.weight", (T_D, T_FF), "rand"),
            (p + "input_layernorm.weight", (T_D,), "ones"),
            (p + "post_attention_layernorm.weight", (T_D,), "ones"),
        ]
    return out


def write_checkpoint(folder: Path, n_text: int, n_vision: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    block = _bf16(rng.standard_normal(BLOCK, dtype=np.float32) * 0.02)
    specs = tensors(n_text, n_vision)
    header: dict[str, object] = {}
    off = 0
    for name, shape, _ in specs:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dp = (V_HEADS + V_DUMMY) * (V_D // V_HEADS)
    with (folder / "model.safetensors").open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape, fill in specs:
            count = int(np.prod(shape))
            if fill == "ones":
                fh.write(_bf16(np.ones(count, np.float32)).tobytes())
            elif fill == "qkv":
                a = np.resize(block, (3, dp, V_D)).copy()
                a[:, V_D:] = 0  # the 7 dummy heads of q, k and v
                fh.write(a.tobytes())
            elif fill == "proj":
                a = np.resize(block, (V_D, dp)).copy()
                a[:, V_D:] = 0
                fh.write(a.tobytes())
            else:
                left = count
                while left:
                    k = min(left, BLOCK)
                    fh.write(block[:k].tobytes())
                    left -= k
    config = {
        "architectures": ["NVLM_D"],
        "model_type": "NVLM_D",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "max_dynamic_patch": 6,
        "min_dynamic_patch": 1,
        "use_thumbnail": True,
        "ps_version": "v2",
        "select_layer": -1,
        "vision_config": {
            "hidden_size": V_D,
            "num_attention_heads": V_HEADS,
            "intermediate_size": V_FF,
            "num_hidden_layers": n_vision,
            "image_size": 448,
            "patch_size": 14,
            "norm_type": "rms_norm",
            "layer_norm_eps": 1e-6,
            "qk_normalization": True,
            "qkv_bias": False,
            "hidden_act": "gelu",
        },
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": T_D,
            "intermediate_size": T_FF,
            "num_hidden_layers": n_text,
            "num_attention_heads": T_HEADS,
            "num_key_value_heads": T_KV,
            "vocab_size": VOCAB,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokens = {f"t{i}": i for i in range(VOCAB - 3)}
    tj = {
        "model": {"type": "BPE", "vocab": tokens, "merges": []},
        "added_tokens": [
            {"id": VOCAB - 3 + i, "content": c, "special": True}
            for i, c in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        ],
    }
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return off


CHILD = """
import json, resource, sys, time
from pathlib import Path
from mmchat.converters import convert
t = time.perf_counter()
r = convert(Path(sys.argv[1]), outdir=Path(sys.argv[2]), quant=sys.argv[3], vision_quant="f16")
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "source_bytes": r.source_bytes,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/nvlm72"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    rows = []
    for n in args.layers:
        src, out = args.dir / f"src{n}", args.dir / f"out{n}"
        t0 = time.perf_counter()
        size = write_checkpoint(src, n, n)
        gen = time.perf_counter() - t0
        r = subprocess.run(
            [sys.executable, "-c", CHILD, str(src), str(out), args.quant],
            capture_output=True,
            text=True,
        )
        if r.returncode:
            sys.exit(r.stderr)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append((n, size, res))
        print(
            f"layers {n} (text + vision): source {size / 1e9:.2f} GB (written in {gen:.0f} s), "
            f"convert {res['seconds']:.0f} s = {res['source_bytes'] / 1e6 / res['seconds']:.0f} "
            f"MB/s, peak RSS {res['peak_rss_kb'] / 1e6:.2f} GB"
        )
        if not args.keep:
            shutil.rmtree(src)
            shutil.rmtree(out)
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB)")


if __name__ == "__main__":
    main()
