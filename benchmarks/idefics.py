"""IDEFICS decoder speed: mmchat's native cross-attention decoder vs transformers (fp32, same
threads), and vs llama.cpp on the same Llama weights without the gated blocks.

    python benchmarks/idefics.py --torch-python /work/venv-flamingo/bin/python --threads 2 [--write]

A random "tiny but wide" ``IdeficsForVisionText2Text`` (``--hidden`` wide, ``--layers``
layers, a gated cross-attention block every 2nd layer, 64 Perceiver latents; a one-block ViT
so the image side costs nothing) is made and timed in a torch interpreter
(``--torch-python``; the project's environment has no torch): prompt evaluation of
``--prompt`` tokens with one image, then ``--gen`` greedy tokens (``generate``; decode time =
generate - prefill). The folder is converted (f32) and timed through ``FlamingoBackend``
(f32 KV), and the same text GGUF with every ``blk.N.x*`` tensor stripped through libllama
(f32 KV, flash attention off): what the gated blocks cost, next to their FLOP share.
Medians of ``--runs`` after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## idefics"
TOKENIZER = ROOT / "tests" / "fixtures" / "idefics" / "idefics_tiny"


def torch_side(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Runs in the torch interpreter: write the checkpoint, time transformers."""
    import shutil

    import torch
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h = args.hidden
    cfg = IdeficsConfig(
        vocab_size=512,
        additional_vocab_size=2,
        hidden_size=h,
        intermediate_size=int(h * 2.75) // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=h // 64,
        cross_layer_interval=2,
        qk_layer_norms=True,
        alpha_type="vector",
        use_resampler=True,
        max_position_embeddings=4096,
        freeze_text_layers=False,
        freeze_vision_layers=False,
        vision_config={
            "embed_dim": 256,
            "image_size": 28,
            "intermediate_size": 512,
            "patch_size": 14,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
        },
        perceiver_config={
            "use_resampler": True,
            "resampler_n_latents": 64,
            "resampler_depth": 1,
            "resampler_n_heads": 4,
            "resampler_head_dim": 64,
        },
    )
    model = IdeficsForVisionText2Text(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.fill_(0.5)
            elif p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    model.save_pretrained(folder, safe_serialization=True)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, folder / f)
    shutil.copy(TOKENIZER / "preprocessor_config.json", folder / "preprocessor_config.json")
    ids = [1, 512, 513, 512] + [int(x) for x in np.random.default_rng(0).integers(3, 500, 4096)]
    ids = ids[: args.prompt]
    input_ids = torch.tensor([ids])
    px = torch.randn(1, 1, 3, 28, 28)
    mask = torch.zeros(1, len(ids), 1, dtype=torch.long)
    mask[0, 2:, 0] = 1
    pre, gen = [], []
    with torch.no_grad():
        for _ in range(args.runs + 1):
            t0 = time.perf_counter()
            model(input_ids=input_ids, pixel_values=px, image_attention_mask=mask, use_cache=True)
            pre.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.generate(
                input_ids=input_ids,
                pixel_values=px,
                image_attention_mask=mask,
                max_new_tokens=args.gen,
                min_new_tokens=args.gen,
                do_sample=False,
            )
            gen.append(time.perf_counter() - t0)
        lat = model.model.perceiver_resampler(model.model.vision_model(px[0]).last_hidden_state)
    np.save(folder / "latents.npy", lat[0].numpy())
    (folder / "ids.json").write_text(json.dumps(ids))
    p, g = statistics.median(pre[1:]), statistics.median(gen[1:])
    return {
        "prefill_s": p,
        "decode_s_per_tok": max(g - p, 1e-9) / args.gen,
        "torch": torch.__version__,
        "n_ff": cfg.intermediate_size,
    }


def strip_cross(src: Path, dst: Path) -> None:
    """The text GGUF without the gated blocks: a plain llama.cpp Llama."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(src)
    w = GGUFWriter(dst, "llama")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        val = f.contents()
        sub = f.types[-1] if vt == GGUFValueType.ARRAY else None
        w.add_key_value(f.name, val, vt, sub_type=sub)
    for t in r.tensors:
        if ".x" in t.name:
            continue
        w.add_tensor(
            t.name,
            np.asarray(t.data),
            raw_shape=list(reversed([int(x) for x in t.shape])),
            raw_dtype=t.tensor_type,
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def time_loop(
    prefill: Callable[[], None], step: Callable[[int], None], n: int, runs: int, gen: int
) -> tuple[float, float]:
    """Median prompt seconds and decode seconds per token over ``runs`` after one warm-up:
    ``prefill()`` evaluates the ``n``-token prompt, ``step(pos)`` one greedy token."""
    pre, dec = [], []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        prefill()
        pre.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(gen):
            step(n + i)
        dec.append((time.perf_counter() - t0) / gen)
    return statistics.median(pre[1:]), statistics.median(dec[1:])


def write_section(section: str, text: str) -> None:
    """Put ``text`` (starting with the ``section`` heading) into benchmarks/RESULTS.md in
    place of that section's old text, or at the end."""
    old = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    if section in old:
        head, rest = old.split(section, 1)
        nxt = rest.find("\n## ")
        old = head + (rest[nxt + 1 :] if nxt >= 0 else "")
    RESULTS.write_text(old.rstrip("\n") + "\n\n" + text)


def native_side(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    from mmchat.converters import convert

    from mmchat.runtime import _llama
    from mmchat.runtime.flamingo import FlamingoBackend

    r = convert(folder, outdir=folder / "gguf", quant="f32", vision_quant="f32")
    ids = np.asarray(json.loads((folder / "ids.json").read_text()), dtype=np.int32)
    lat = np.load(folder / "latents.npy")
    n = len(ids)

    def timed(prefill: Any, step: Any) -> tuple[float, float]:
        return time_loop(prefill, step, n, args.runs, args.gen)

    be = FlamingoBackend(
        r.model_path,
        n_ctx=n + args.gen + 8,
        n_batch=512,
        n_threads=args.threads,
        device="cpu",
        image_token=513,
        eos_token=2,
        n_image_rows=lat.shape[0],
    )

    def fl_prefill() -> None:
        be.clear()
        be.decode_tokens(ids[:2], 0, logits_last=False)
        be.decode_embeddings(lat, 2, logits_last=False)
        be.decode_tokens(ids[3:], 3, logits_last=True)

    def fl_step(pos: int) -> None:
        be.decode_one(int(np.argmax(be.last_logits())), pos)

    fl = timed(fl_prefill, fl_step)
    be.close()

    plain = folder / "plain.gguf"
    strip_cross(r.model_path, plain)
    tm = _llama.TextModel(str(plain), n_gpu_layers=0)
    ctx = _llama.Context(
        tm,
        n_ctx=n + args.gen + 8,
        n_batch=512,
        n_threads=args.threads,
        flash_attn=False,
        kv_cache_type="f32",
    )

    def ll_prefill() -> None:
        ctx.clear()
        ctx.decode_tokens(ids, 0, logits_last=True)

    def ll_step(pos: int) -> None:
        ctx.decode_one(int(np.argmax(ctx.last_logits())), pos)

    ll = timed(ll_prefill, ll_step)
    ctx.close()
    tm.close()
    return {"native": fl, "llama": ll}


def flop_share(h: int, ff: int, layers: int, n_lat: int, ctx: int) -> float:
    """Per-token FLOPs of the gated blocks relative to the plain decoder's."""
    self_layer = 4 * h * h + 3 * h * ff + 2 * h * ctx
    cross = 2 * h * h + 3 * h * ff + 2 * h * n_lat
    return (layers // 2) * cross / (layers * self_layer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--torch-python", default="/work/venv-flamingo/bin/python")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(torch_side(Path(args.child), args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "idefics_wide"
        folder.mkdir()
        cmd = [args.torch_python, __file__, "--child", str(folder)]
        cmd += [
            f"--{k}={getattr(args, k)}"
            for k in ("threads", "hidden", "layers", "prompt", "gen", "runs")
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
        ref = json.loads(out.strip().splitlines()[-1])
        nat = native_side(folder, args)
    share = flop_share(args.hidden, ref["n_ff"], args.layers, 64, args.prompt)
    (fp, fd), (lp, ld) = nat["native"], nat["llama"]
    rows = [
        ("transformers fp32 (IDEFICS)", ref["prefill_s"], ref["decode_s_per_tok"]),
        ("mmchat native decoder (IDEFICS, f32)", fp, fd),
        ("llama.cpp, same Llama without gated blocks (f32)", lp, ld),
    ]
    lines = [
        SECTION,
        "",
        f"Command: `python benchmarks/idefics.py --threads {args.threads} --hidden {args.hidden} "
        f"--layers {args.layers} --prompt {args.prompt} --gen {args.gen}`",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), "
        f"torch {ref['torch']}, {time.strftime('%Y-%m-%d')}.",
        "",
        "| engine | prompt tok/s | decode tok/s |",
        "| --- | ---: | ---: |",
    ]
    for name, p, d in rows:
        lines.append(f"| {name} | {args.prompt / p:.0f} | {1 / d:.1f} |")
    lines += [
        "",
        f"native vs transformers: prompt {ref['prefill_s'] / fp:.2f}x, decode "
        f"{ref['decode_s_per_tok'] / fd:.2f}x; gated blocks' cost over llama.cpp: prompt "
        f"{fp / lp:.2f}x, decode {fd / ld:.2f}x, their FLOP share predicts {1 + share:.2f}x.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
