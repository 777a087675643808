"""Tile encode time of an InternViT-300M-shaped tower (InternVL3-1B's: 1024 wide, 24 blocks,
16 heads, FFN 4096, LayerNorm, q/k/v biases, 448 px, patch 14): libmmvision's ``internvit``
graph against llama.cpp's mtmd ``internvl`` graph, same random weights, same threads.

Both files are written here from one set of random f32 weights (mtmd's tensor names as
llama.cpp's converter writes them, ours as docs/nvlm.md), stored as ``--type`` (f16 default)
for the matmul weights. The projector ends at the width of the text model mtmd needs to open
a projector (the tiny InternVL fixture's Qwen2, 64): its cost is small next to the tower's.
One 448x448 image is one tile for both engines (no thumbnail); the rows of the two are
compared as well (relative L2): mtmd's ``internvl`` graph appends the class token after the
patches but adds the position table in the checkpoint's order (class position first), so every
patch gets its neighbour's position embedding; its rows differ from the reference.

    python benchmarks/nvlm_internvit_encode.py [--threads 2] [--repeat 3] [--type f16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

D, HEADS, FF, LAYERS, IMG, PATCH = 1024, 16, 4096, 24, 448, 14
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "fixtures" / "mtmd" / "internvl" / "model.gguf"
N_EMBD = 64


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def r(*shape: int, s: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * s).astype(np.float32)

    n_pos = (IMG // PATCH) ** 2 + 1
    w = {
        "patch_w": r(D, 3, PATCH, PATCH),
        "patch_b": r(D),
        "cls": r(D, s=0.5),
        "pos": r(n_pos, D, s=0.5),
        "mm_ln_w": 1 + r(4 * D, s=0.1),
        "mm_ln_b": r(4 * D, s=0.1),
        "mm_up_w": r(N_EMBD, 4 * D, s=0.05),
        "mm_up_b": r(N_EMBD),
        "mm_down_w": r(N_EMBD, N_EMBD, s=0.1),
        "mm_down_b": r(N_EMBD),
    }
    for i in range(LAYERS):
        for k in ("q", "k", "v", "o"):
            w[f"{i}.{k}_w"], w[f"{i}.{k}_b"] = r(D, D), r(D)
        w[f"{i}.up_w"], w[f"{i}.up_b"] = r(FF, D), r(FF)
        w[f"{i}.down_w"], w[f"{i}.down_b"] = r(D, FF), r(D)
        for k in ("ln1", "ln2"):
            w[f"{i}.{k}_w"], w[f"{i}.{k}_b"] = 1 + r(D, s=0.1), r(D, s=0.1)
        w[f"{i}.ls1"], w[f"{i}.ls2"] = 0.1 + r(D, s=0.02), 0.1 + r(D, s=0.02)
    return w


def write(path: Path, w: dict[str, np.ndarray], *, mtmd: bool, wtype: str) -> None:
    g = GGUFWriter(path, "clip")
    g.add_type("mmproj")
    g.add_bool("clip.has_vision_encoder", True)
    g.add_string("clip.projector_type", "internvl" if mtmd else "internvit")
    g.add_bool("clip.use_gelu", True)
    for k, v in (
        ("image_size", IMG),
        ("patch_size", PATCH),
        ("embedding_length", D),
        ("feed_forward_length", FF),
        ("block_count", LAYERS),
        ("projection_dim", N_EMBD),
    ):
        g.add_uint32(f"clip.vision.{k}", v)
    g.add_uint32("clip.vision.attention.head_count", HEADS)
    g.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    g.add_array("clip.vision.image_mean", MEAN)
    g.add_array("clip.vision.image_std", STD)
    if mtmd:
        g.add_uint32("clip.vision.projector.scale_factor", 2)
    else:
        g.add_string("internvit.norm_type", "layer_norm")
        g.add_bool("internvit.qk_norm", False)
        g.add_uint32("internvit.tiling.max_tiles", 12)
        g.add_string("internvit.prompt_style", "internvl")

    def add(name: str, a: np.ndarray, matmul: bool = False) -> None:
        if matmul and wtype == "f16":
            g.add_tensor(name, a.astype(np.float16), raw_dtype=GGMLQuantizationType.F16)
        else:
            g.add_tensor(name, a)

    n_pos = w["pos"].shape[0]
    add("v.patch_embd.weight", w["patch_w"])
    add("v.patch_embd.bias", w["patch_b"])
    add("v.class_embd", w["cls"].reshape((1, 1, D) if mtmd else (D,)))
    add("v.position_embd.weight", w["pos"].reshape((1, n_pos, D) if mtmd else (n_pos, D)))
    names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_out", "up": "ffn_up"}
    names["down"] = "ffn_down"
    for i in range(LAYERS):
        b = f"v.blk.{i}."
        for k, gg in names.items():
            add(f"{b}{gg}.weight", w[f"{i}.{k}_w"], True)
            add(f"{b}{gg}.bias", w[f"{i}.{k}_b"])
        for k in ("ln1", "ln2"):
            add(f"{b}{k}.weight", w[f"{i}.{k}_w"])
            add(f"{b}{k}.bias", w[f"{i}.{k}_b"])
        for k in ("ls1", "ls2"):
            add(f"{b}{k}.weight" if mtmd else f"{b}{k}", w[f"{i}.{k}"])
    mm = ("mm.model.mlp.0", "mm.model.mlp.1", "mm.model.mlp.3")  # the same in both
    add(f"{mm[0]}.weight", w["mm_ln_w"])
    add(f"{mm[0]}.bias", w["mm_ln_b"])
    add(f"{mm[1]}.weight", w["mm_up_w"], True)
    add(f"{mm[1]}.bias", w["mm_up_b"])
    add(f"{mm[2]}.weight", w["mm_down_w"], True)
    add(f"{mm[2]}.bias", w["mm_down_b"])
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--type", choices=("f16", "f32"), default="f16")
    args = ap.parse_args()

    from PIL import Image

    from mmchat.runtime import _llama
    from mmchat.vision import open_vision
    from mmchat.vision.cache import EmbeddingCache
    from mmchat.vision.image import load_image
    from mmchat.vision.internvit import InternVitEngine
    from mmchat.vision.synthetic import rel_l2

    w = weights()
    with tempfile.TemporaryDirectory() as tmp:
        ours_path, mtmd_path = Path(tmp) / "ours.gguf", Path(tmp) / "mtmd.gguf"
        write(ours_path, w, mtmd=False, wtype=args.type)
        write(mtmd_path, w, mtmd=True, wtype=args.type)
        rng = np.random.default_rng(1)
        img_path = Path(tmp) / "tile.png"
        Image.fromarray(rng.integers(0, 256, (IMG, IMG, 3), dtype=np.uint8)).save(img_path)
        _llama.ensure_backend(False)
        text = _llama.TextModel(str(TEXT), n_gpu_layers=0)
        engines: dict[str, Any] = {}
        for label, path, engine, fa in (
            ("libmmvision internvit", ours_path, "mmvision", None),
            ("libmmvision internvit fast math", ours_path, "fast", None),
            ("mtmd internvl (flash attn on)", mtmd_path, "mtmd", True),
            ("mtmd internvl (flash attn off)", mtmd_path, "mtmd", False),
        ):
            if engine == "fast":  # f16 K/V and tanh GELU, as mtmd computes them
                engines[label] = InternVitEngine(
                    path,
                    text_n_embd=N_EMBD,
                    n_threads=args.threads,
                    device="cpu",
                    fast_math=True,
                    cache=EmbeddingCache(0),
                )
            else:
                engines[label] = open_vision(
                    path,
                    text_n_embd=N_EMBD,
                    n_threads=args.threads,
                    device="cpu",
                    llama_model=text.address,
                    engine=engine,
                    flash_attn=fa,
                    cache=EmbeddingCache(0),
                )
        img = load_image(img_path)
        best: dict[str, float] = {}
        rows: dict[str, np.ndarray] = {}
        try:
            # rounds over all engines in turn (a shared machine's load hits them alike)
            for _ in range(args.repeat + 1):
                for label, eng in engines.items():
                    t0 = time.perf_counter()
                    out = eng.encode(img).embeddings
                    dt = time.perf_counter() - t0
                    if label in rows:  # the first round warms up
                        best[label] = min(best.get(label, dt), dt)
                    rows[label] = np.array(out)
        finally:
            for eng in engines.values():
                eng.close()
        results = {k: (best[k], rows[k]) for k in engines}
        text.close()
    base_t, base_rows = results["libmmvision internvit"]
    print(f"InternViT-300M-shaped tower, one 448-px tile, {args.type}, {args.threads} threads:")
    for label, (t, got) in results.items():
        print(
            f"  {label:32s} {t * 1000:8.0f} ms  ({t / base_t:.2f}x of libmmvision)  "
            f"rows rel L2 vs libmmvision {rel_l2(got, base_rows):.1e}"
        )


if __name__ == "__main__":
    main()
