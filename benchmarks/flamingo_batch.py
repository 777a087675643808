"""Parallel generation on the cross-attention decoder (issue 18): one ``mmd_decode_batch``
graph for every sequence's next token (``FlamingoBackend.decode_mixed``) against one
``mmd_decode`` per sequence (what ``decode_mixed`` did before), on a wide random IDEFICS.

    python benchmarks/flamingo_batch.py --torch-python /work/venv-flamingo/bin/python --threads 2

The checkpoint is benchmarks/idefics.py's (its torch child writes it: ``--hidden`` wide,
``--layers`` layers, a gated cross-attention block every 2nd layer, 64 Perceiver latents),
converted to f32 and run with f32 KV. Each of ``--seqs`` sequences gets its own ``--prompt``
token prompt with its own image rows; then ``--gen`` steps of one token per sequence are
timed both ways (median of ``--runs`` after one warm-up), and the two ways' logits compared.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--torch-python", default="/work/venv-flamingo/bin/python")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    from mmchat.converters import convert

    from mmchat.runtime.flamingo import FlamingoBackend
    from mmchat.vision.synthetic import rel_l2

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "idefics_wide"
        folder.mkdir()
        # the checkpoint only: the child's own transformers timing is kept as short as it goes
        child = [args.torch_python, str(ROOT / "benchmarks" / "idefics.py"), "--child", str(folder)]
        child += [f"--threads={args.threads}", f"--hidden={args.hidden}", f"--layers={args.layers}"]
        child += ["--prompt=8", "--gen=1", "--runs=1"]
        subprocess.run(child, check=True, capture_output=True, text=True, env=os.environ)
        r = convert(folder, outdir=folder / "gguf", quant="f32", vision_quant="f32")
        latents = np.load(folder / "latents.npy")
        n, steps = args.prompt, args.gen
        be = FlamingoBackend(
            r.model_path,
            n_ctx=n + steps + 8,
            n_seq=args.seqs,
            n_batch=512,
            n_threads=args.threads,
            device="cpu",
            image_token=513,
            eos_token=2,
            n_image_rows=latents.shape[0],
        )
        rng = np.random.default_rng(0)
        seqs = np.arange(args.seqs, dtype=np.int32)
        for s in seqs:  # <s> <fake> <image> <fake> text..., each with its own image and text
            ids = np.concatenate([[1, 512], rng.integers(3, 500, n - 2)]).astype(np.int32)
            be.decode_tokens(ids[:2], 0, logits_last=False, seq_id=int(s))
            rows = latents + rng.normal(0.0, 0.1, latents.shape).astype(np.float32)
            be.decode_embeddings(rows, 2, logits_last=False, seq_id=int(s))
            be.decode_tokens(ids[3:], 3, logits_last=True, seq_id=int(s))
        tokens = rng.integers(3, 500, (steps, args.seqs)).astype(np.int32)

        def looped(k: int) -> list[np.ndarray]:
            out = []
            for s in seqs:
                be.decode_one(int(tokens[k, s]), n + k, int(s))
                out.append(be.last_logits())
            return out

        def batched(k: int) -> list[np.ndarray]:
            pos = np.full(args.seqs, n + k, np.int32)
            be.decode_mixed(tokens[k], pos, seqs, np.ones(args.seqs, np.int8))
            return [be.logits_at(i) for i in range(args.seqs)]

        def timed(step: Callable[[int], list[np.ndarray]]) -> tuple[float, list[np.ndarray]]:
            per_step, first = [], []
            for _ in range(args.runs + 1):
                for s in seqs:
                    be.truncate(n, int(s))
                t0 = time.perf_counter()
                for k in range(steps):
                    got = step(k)
                    first = first or got
                per_step.append((time.perf_counter() - t0) / steps)
            return statistics.median(per_step[1:]), first

        t_loop, l_loop = timed(looped)
        t_batch, l_batch = timed(batched)
        be.close()
    err = max(rel_l2(a, b) for a, b in zip(l_batch, l_loop, strict=True))
    print(
        f"IDEFICS {args.hidden} x {args.layers} layers, f32, {args.seqs} sequences of "
        f"{args.prompt} tokens + 1 image each, {args.threads} threads, "
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)\n"
        f"one graph per sequence (before): {t_loop * 1000:.1f} ms per step "
        f"({args.seqs / t_loop:.1f} tok/s)\n"
        f"one graph for all (decode_mixed): {t_batch * 1000:.1f} ms per step "
        f"({args.seqs / t_batch:.1f} tok/s)\n"
        f"speed-up {t_loop / t_batch:.2f}x; first step's logits, batched vs one by one: "
        f"max rel L2 {err:.1e}"
    )


if __name__ == "__main__":
    main()
