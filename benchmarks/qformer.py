"""Q-Former image encode time: mmchat's libmmvision vs transformers (torch), same threads.

    python benchmarks/qformer.py --torch-python /work/venv-qf/bin/python --threads 2 \
        [--runs 3] [--rounds 3] [--write]

An InstructBLIP shaped like the published ones (EVA-ViT-g: 39 blocks, 1408 wide, 16 heads,
FFN 6144, 224 px; Q-Former: BERT-base, 12 layers, cross-attention every 2nd, 32 queries;
language projection to 4096) with random weights is made with transformers' own classes in
a torch interpreter (``--torch-python``; the project's environment has no torch), stored as
float16 safetensors, and timed there: ``get_image_features`` (EVA -> ln_vision -> Q-Former
with the instruction -> projection) in float32, torch's CPU path. The same folder is then
converted by ``mmchat convert`` (vision f16 and q8_0) and timed through libmmvision on the
same preprocessed pixels and instruction ids. The language model is a one-layer stand-in
(only its width matters here). ``--vision-layers`` shortens the EVA tower for a quick look.
Both sides: ``--rounds`` alternating rounds (torch, then ours at f16 and q8_0), each of
``--runs`` timed encodes after one warm-up, so that load from other jobs on a shared machine
falls on both sides; the table gives the median and the fastest of all timed runs, and the
load average before and after. The rows are compared (rel L2) too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## qformer"
INSTRUCTION = "What is unusual about this image?"
QFORMER_TOKENIZER = ROOT / "tests" / "fixtures" / "qformer" / "instructblip_llama"


def make_and_time_reference(folder: Path, threads: int, runs: int, layers: int) -> None:
    """Runs in the torch interpreter: write the checkpoint once, time transformers on it."""
    import shutil

    import torch
    from transformers import (
        BertTokenizer,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
    )

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = InstructBlipConfig(
        vision_config={
            "hidden_size": 1408,
            "intermediate_size": 6144,
            "num_hidden_layers": layers,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "qkv_bias": True,
        },
        qformer_config={"vocab_size": 30523},
        text_config={
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 32,
            "vocab_size": 520,
        },
        num_query_tokens=32,
        image_token_index=512,
    )
    if not (folder / "model.safetensors").is_file():
        model = InstructBlipForConditionalGeneration(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.02)
        model.half().save_pretrained(folder, safe_serialization=True)
        del model
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(QFORMER_TOKENIZER / name, folder / name)
        qdir = "qformer_tokenizer"
        shutil.copytree(QFORMER_TOKENIZER / qdir, folder / qdir, dirs_exist_ok=True)
    # the stored (f16) weights, computed in f32: every round times the same model
    model = InstructBlipForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    qtok = BertTokenizer.from_pretrained(str(folder / "qformer_tokenizer"))
    ids = torch.tensor([qtok(INSTRUCTION)["input_ids"]])
    rng = np.random.default_rng(0)
    px = torch.from_numpy(rng.normal(0, 1, (1, 3, 224, 224)).astype(np.float32))
    times = []
    with torch.no_grad():
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            rows = model.get_image_features(px, qformer_input_ids=ids, return_dict=True)
            times.append(time.perf_counter() - t0)
    np.save(folder / "pixels.npy", px[0].numpy())
    np.save(folder / "rows.npy", rows.pooler_output[0].numpy())
    (folder / "reference.json").write_text(
        json.dumps(
            {
                "torch_ms": [t * 1000 for t in times[1:]],
                "torch": torch.__version__,
                "ids": ids[0].tolist(),
                "threads": threads,
                "vision_layers": layers,
            }
        )
    )


def converted(folder: Path, vq: str, workdir: Path) -> Path:
    """The vision GGUF of ``folder`` at ``vq`` (converted once, cached under workdir)."""
    out = workdir / f"{folder.name}-gguf-{vq}"
    found = next(out.glob("mmproj-*.gguf"), None) if out.is_dir() else None
    if found is not None:
        return found
    from mmchat.converters import convert

    return convert(folder, outdir=out, quant="f16", vision_quant=vq).mmproj_path


def time_ours(folder: Path, mmproj: Path, threads: int, runs: int) -> dict[str, Any]:
    from mmchat.native import NativeVisionModel, load_library
    from mmchat.vision.synthetic import rel_l2

    ref = json.loads((folder / "reference.json").read_text())
    px = np.load(folder / "pixels.npy")[None]
    model = NativeVisionModel(load_library(), mmproj, device="cpu", n_threads=threads)
    try:
        times = []
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            rows = model.encode(px, ref["ids"])
            times.append(time.perf_counter() - t0)
    finally:
        model.close()
    return {
        "ms": [t * 1000 for t in times[1:]],
        "rel_l2": rel_l2(rows[0], np.load(folder / "rows.npy")),
        "bytes": mmproj.stat().st_size,
    }


def time_ours_with(
    lib: Path, folder: Path, mmproj: Path, threads: int, runs: int
) -> dict[str, Any]:
    """time_ours in a child process that loads libmmvision from ``lib`` (one per process)."""
    env = {**os.environ, "MMCHAT_NATIVE_LIB": str(lib)}
    out = subprocess.run(
        [sys.executable, __file__, "--time-ours", str(mmproj), "--workdir", str(folder),
         "--threads", str(threads), "--runs", str(runs)],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-python", type=Path, help="an interpreter with torch+transformers")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=3, help="timed encodes per round and side")
    ap.add_argument("--rounds", type=int, default=3, help="alternating torch / ours rounds")
    ap.add_argument("--vision-layers", type=int, default=39)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mmchat-bench-qformer"))
    ap.add_argument("--write", action="store_true", help=f"update '{SECTION}' in RESULTS.md")
    ap.add_argument(
        "--baseline-lib",
        type=Path,
        help="also time this libmmvision (e.g. a build of an older commit) in the same rounds",
    )
    ap.add_argument("--reference-only", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--time-ours", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reference_only is not None:
        make_and_time_reference(args.reference_only, args.threads, args.runs, args.vision_layers)
        return 0
    if args.time_ours is not None:  # child of time_ours_with; --workdir is the model folder
        print(json.dumps(time_ours(args.workdir, args.time_ours, args.threads, args.runs)))
        return 0
    if args.baseline_lib is not None and not args.baseline_lib.is_file():
        print(f"--baseline-lib: {args.baseline_lib} is not a file")
        return 2
    folder = args.workdir / f"instructblip-eva{args.vision_layers}"
    if args.torch_python is None:
        print("--torch-python is required (the reference runs in a torch interpreter)")
        return 2

    def torch_round() -> list[float]:
        subprocess.run(
            [str(args.torch_python), __file__, "--reference-only", str(folder),
             "--threads", str(args.threads), "--runs", str(args.runs),
             "--vision-layers", str(args.vision_layers)],
            check=True,
        )  # fmt: skip
        return list(json.loads((folder / "reference.json").read_text())["torch_ms"])

    load_before = _load()
    torch_ms = torch_round()  # writes the checkpoint on the first call
    # convert first: timing right after writing a GB-sized file measured the writeback too
    files = {vq: converted(folder, vq, args.workdir) for vq in ("f16", "q8_0")}
    ours: dict[str, list[float]] = {vq: [] for vq in files}
    base: dict[str, list[float]] = {vq: [] for vq in files}
    found: dict[str, dict[str, Any]] = {}
    found_base: dict[str, dict[str, Any]] = {}
    for i in range(args.rounds):
        if i > 0:
            torch_ms += torch_round()
        for vq, mmproj in files.items():
            found[vq] = time_ours(folder, mmproj, args.threads, args.runs)
            ours[vq] += found[vq]["ms"]
            if args.baseline_lib is not None:
                found_base[vq] = time_ours_with(
                    args.baseline_lib, folder, mmproj, args.threads, args.runs
                )
                base[vq] += found_base[vq]["ms"]
    load_after = _load()
    ref = json.loads((folder / "reference.json").read_text())
    t_med, t_min = statistics.median(torch_ms), min(torch_ms)
    rows = []
    for label, times, results in (("", ours, found), (" (baseline lib)", base, found_base)):
        for vq, r in results.items():
            o_med, o_min = statistics.median(times[vq]), min(times[vq])
            rows.append(
                f"| {vq}{label} | {o_med:.0f} ({o_min:.0f}) | {t_med:.0f} ({t_min:.0f}) "
                f"| {o_med / t_med:.2f} ({o_min / t_min:.2f}) | {r['rel_l2']:.1e} "
                f"| {r['bytes'] / 2**20:.0f} MiB |"
            )
    n = args.rounds * args.runs
    text = "\n".join(
        [
            SECTION,
            "",
            f"`python benchmarks/qformer.py --torch-python <torch python> --threads "
            f"{args.threads} --runs {args.runs} --rounds {args.rounds} --vision-layers "
            f"{args.vision_layers}{' --baseline-lib <lib>' if args.baseline_lib else ''}` — "
            f"{time.strftime('%Y-%m-%d')}, {_cpu_name()} "
            f"({os.cpu_count()} CPUs), {args.threads} threads, CPU, torch {ref['torch']}; "
            f"load average (1/5/15 min) {load_before} before, {load_after} after.",
            f"InstructBLIP shape: EVA-ViT-g ({args.vision_layers} of 39 blocks, 1408 wide, "
            "224 px) + Q-Former (BERT-base, 32 queries, instruction of "
            f"{len(ref['ids'])} ids) + projection to 4096; random weights (f16-representable); "
            f"{args.rounds} alternating rounds of {args.runs} timed encodes per side after a "
            f"warm-up: median of the {n} (fastest in brackets); pixels preprocessed.",
            "",
            "| vision file | ours ms | torch f32 ms | ours/torch | rows rel L2 vs torch | size |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
        ]
    )
    print(text)
    if args.write:
        _write_section(text)
    return 0


def _write_section(text: str) -> None:
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else ""
    start = old.find(SECTION + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("" if end < 0 else old[end:])
    RESULTS.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
