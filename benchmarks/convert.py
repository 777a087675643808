"""Benchmark `mmchat convert` on a synthetic checkpoint with 7B-like shapes.

Builds a llava-hf ``LlavaForConditionalGeneration`` checkpoint in bf16 safetensors with
Llama-2-7B / LLaVA-1.5-7B layer shapes (hidden 4096, ffn 11008, 32 heads, vocab 32000) and
CLIP ViT-L/14-336 vision shapes, but only a few layers (>= 1 GB of weights by default),
then measures, each in a fresh process:

* ``mmchat convert`` to f16 and to q4_k_m (text) -- one pass, text + mmproj;
* optionally the reference two-step path on the same checkpoint: llama.cpp's
  ``convert_hf_to_gguf.py --outtype f16`` (text only: it has no LLaVA-1.5 mmproj
  converter) followed by ``llama_model_quantize`` to Q4_K_M (llama-cpp-python's binding
  of llama.cpp's own quantizer).

Reported: wall time, source MB/s (checkpoint bytes / wall time) and peak RSS
(``ru_maxrss`` of the process doing the work). Run::

    python benchmarks/convert.py --layers 2 [--reference LLAMA_CPP_DIR --reference-python PY]

``LLAMA_CPP_DIR`` is a llama.cpp source tree (convert_hf_to_gguf.py, conversion/,
gguf-py/) and ``PY`` a Python with torch, transformers and sentencepiece.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_SRC = ROOT / "tests" / "fixtures" / "llava15_hf"

HIDDEN, FFN, HEADS, VOCAB = 4096, 11008, 32, 32000
V_HIDDEN, V_FFN, V_HEADS, V_IMAGE, V_PATCH = 1024, 4096, 16, 336, 14


def _bf16(arr: np.ndarray) -> bytes:
    """float32 -> bfloat16 bytes (round to nearest even)."""
    u = arr.astype(np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def _shapes(layers: int, vision_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = [
        ("language_model.model.embed_tokens.weight", (VOCAB, HIDDEN)),
        ("language_model.model.norm.weight", (HIDDEN,)),
        ("language_model.lm_head.weight", (VOCAB, HIDDEN)),
    ]
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.v_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "mlp.gate_proj.weight", (FFN, HIDDEN)),
            (p + "mlp.up_proj.weight", (FFN, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, FFN)),
        ]
    v = "vision_tower.vision_model."
    n_pos = (V_IMAGE // V_PATCH) ** 2 + 1
    out += [
        (v + "embeddings.class_embedding", (V_HIDDEN,)),
        (v + "embeddings.patch_embedding.weight", (V_HIDDEN, 3, V_PATCH, V_PATCH)),
        (v + "embeddings.position_embedding.weight", (n_pos, V_HIDDEN)),
        (v + "pre_layrnorm.weight", (V_HIDDEN,)),
        (v + "pre_layrnorm.bias", (V_HIDDEN,)),
    ]
    for i in range(vision_layers):
        p = f"{v}encoder.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj", (V_HIDDEN, V_HIDDEN)),
            ("self_attn.k_proj", (V_HIDDEN, V_HIDDEN)),
            ("self_attn.v_proj", (V_HIDDEN, V_HIDDEN)),
            ("self_attn.out_proj", (V_HIDDEN, V_HIDDEN)),
            ("layer_norm1", (V_HIDDEN,)),
            ("layer_norm2", (V_HIDDEN,)),
            ("mlp.fc1", (V_FFN, V_HIDDEN)),
            ("mlp.fc2", (V_HIDDEN, V_FFN)),
        ):
            out += [(f"{p}{name}.weight", shape), (f"{p}{name}.bias", (shape[0],))]
    out += [
        ("multi_modal_projector.linear_1.weight", (HIDDEN, V_HIDDEN)),
        ("multi_modal_projector.linear_1.bias", (HIDDEN,)),
        ("multi_modal_projector.linear_2.weight", (HIDDEN, HIDDEN)),
        ("multi_modal_projector.linear_2.bias", (HIDDEN,)),
    ]
    return out


def build_checkpoint(folder: Path, layers: int, vision_layers: int, shard_bytes: int) -> int:
    """Write the synthetic checkpoint (sharded bf16 safetensors); return its weight bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = _shapes(layers, vision_layers)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape in shard:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        with (folder / fname).open("wb") as fh:
            fh.write(struct.pack("<Q", len(head)) + head)
            for name, shape in shard:
                count = int(np.prod(shape))
                scale = 1.0 if name.endswith("norm.weight") or "layer_norm" in name else 0.02
                for start in range(0, count, 1 << 24):
                    m = min(1 << 24, count - start)
                    fh.write(_bf16(rng.standard_normal(m, dtype=np.float32) * scale))
                total += count * 2
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": 32000,
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "text_config": {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": HIDDEN,
            "intermediate_size": FFN,
            "num_hidden_layers": layers,
            "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "vocab_size": VOCAB,
            "torch_dtype": "bfloat16",
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": V_HIDDEN,
            "intermediate_size": V_FFN,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": V_HEADS,
            "image_size": V_IMAGE,
            "patch_size": V_PATCH,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        "torch_dtype": "bfloat16",
        "vocab_size": VOCAB,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER_SRC / name, folder / name)
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    tcfg["added_tokens_decoder"] = {
        k: v for k, v in tcfg.get("added_tokens_decoder", {}).items() if int(k) < 3
    }
    tcfg.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=1))
    shutil.copy(TOKENIZER_SRC / "preprocessor_config.json", folder / "preprocessor_config.json")
    return total


# Each measured step runs in its own process; it prints one JSON line with its peak RSS.
_OURS = """
import json, resource, sys, time
from pathlib import Path
t = time.perf_counter()
from mmchat.converters import convert
r = convert(sys.argv[1], outdir=Path(sys.argv[2]), name="bench", quant=sys.argv[3],
            vision_quant="f16", threads=int(sys.argv[4]))
print(json.dumps({"seconds": time.perf_counter() - t,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "cpu": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
                  "out_bytes": sum(p.n_bytes for p in r.parts),
                  "types": r.parts[0].types}))
"""

_REF_CONVERT = """
import json, resource, runpy, sys, time
t = time.perf_counter()
script = sys.argv[1]
sys.argv = [script, sys.argv[2], "--outtype", "f16", "--outfile", sys.argv[3]]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    if e.code not in (0, None):
        raise
print(json.dumps({"seconds": time.perf_counter() - t,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "cpu": sum(resource.getrusage(resource.RUSAGE_SELF)[:2])}))
"""

_REF_QUANT = """
import json, os, resource, sys, time
t = time.perf_counter()
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
p.nthread = int(sys.argv[3])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)
assert rc == 0, rc
print(json.dumps({"seconds": time.perf_counter() - t,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "cpu": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
                  "out_bytes": os.path.getsize(sys.argv[2])}))
"""


def _run(python: str, code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(
        [python, "-c", code, *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"step failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="text layers (7B has 32)")
    ap.add_argument("--vision-layers", type=int, default=2, help="vision layers (ViT-L has 24)")
    ap.add_argument("--workdir", type=Path, help="keep the checkpoint and outputs here")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quants", default="f16,q4_k_m", help="text quant types to measure")
    ap.add_argument("--reference", type=Path, help="llama.cpp tree for the reference path")
    ap.add_argument("--reference-python", default=sys.executable)
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mmchat-bench-"))
    src = work / "checkpoint"
    t0 = time.perf_counter()
    if not (src / "config.json").is_file():
        total = build_checkpoint(src, args.layers, args.vision_layers, 2 * 1024**3)
    else:
        total = json.loads((src / "model.safetensors.index.json").read_text())["metadata"][
            "total_size"
        ]
    largest = max(int(np.prod(s)) * 4 for _, s in _shapes(args.layers, args.vision_layers))
    print(f"checkpoint: {total / 1e9:.2f} GB bf16 ({time.perf_counter() - t0:.0f} s to build)")
    rows: list[tuple[str, dict, int]] = []
    for quant in args.quants.split(","):
        out = work / f"ours-{quant}"
        shutil.rmtree(out, ignore_errors=True)
        r = _run(sys.executable, _OURS, str(src), str(out), quant, str(args.threads))
        rows.append((f"mmchat convert --quant {quant} (text + mmproj)", r, total))
        shutil.rmtree(out, ignore_errors=True)
    if args.reference is not None:
        text_bytes = sum(
            int(np.prod(s)) * 2
            for n, s in _shapes(args.layers, args.vision_layers)
            if n.startswith("language_model.")
        )
        f16 = work / "ref-f16.gguf"
        q4 = work / "ref-q4_k_m.gguf"
        env = dict(os.environ)
        r1 = _run(
            args.reference_python,
            _REF_CONVERT,
            str(args.reference / "convert_hf_to_gguf.py"),
            str(src),
            str(f16),
            env=env,
        )
        rows.append(
            ("reference step 1: convert_hf_to_gguf.py --outtype f16 (text only)", r1, text_bytes)
        )
        r2 = _run(sys.executable, _REF_QUANT, str(f16), str(q4), str(args.threads))
        rows.append(("reference step 2: llama_model_quantize f16 -> Q4_K_M", r2, text_bytes))
        both = {
            "seconds": r1["seconds"] + r2["seconds"],
            "cpu": r1["cpu"] + r2["cpu"],
            "rss": max(r1["rss"], r2["rss"]),
        }
        rows.append(("reference two-step total (text only)", both, text_bytes))
        for p in (f16, q4):
            p.unlink(missing_ok=True)

    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"largest tensor as float32: {largest / 1e9:.2f} GB")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (wall times depend on it)")
    print("| step | source GB | wall s | CPU s | source MB/s | peak RSS GB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, r, nbytes in rows:
        print(
            f"| {label} | {nbytes / 1e9:.2f} | {r['seconds']:.1f} | {r['cpu']:.1f} | "
            f"{nbytes / 1e6 / r['seconds']:.0f} | {r['rss'] / 1e9:.2f} |"
        )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
