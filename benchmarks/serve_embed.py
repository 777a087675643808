"""Embeddings and blob uploads of `mmchat serve`, against the same work in-process.

* embed: ``POST /api/embed`` with one text per request (p50 over ``--n`` requests, texts
  taking turns with the in-process paths) and with a batch of 32 texts, against mmchat's
  ``Embedder`` called directly and llama-cpp-python's ``Llama(embedding=True).embed``;
  the vectors of the three are compared too (relative L2, float64).
* upload: ``POST /api/blobs/sha256:…`` of a random file by ``curl`` (its own process), against
  sha256 + write + fsync of the same bytes in-process (the floor: what the server must do).

The server runs in its own process (``python -m mmchat serve``) over a temporary store.

    .venv/bin/python benchmarks/serve_embed.py                       # tiny fixture model
    .venv/bin/python benchmarks/serve_embed.py --model nomic-embed-text.gguf --upload-mib 1024
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
TEXTS = [f"document {i}: a red circle and {i % 7} blue squares on a white page" for i in range(64)]


def start_server(home: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "MMCHAT_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmchat", "serve", "--port", "0", "--threads", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"listening on (http://\S+?) ", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise RuntimeError("the server did not start")


def p50(values: list[float]) -> float:
    return statistics.median(values)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / np.linalg.norm(b64))


def bench_embed(url: str, model_path: Path, n: int) -> None:
    import llama_cpp

    from mmchat.runtime import LoadOptions, load_model
    from mmchat.runtime.embedding import normalize, open_embedder

    client = httpx.Client(base_url=url, timeout=120)
    client.post("/api/embed", json={"model": "bench", "input": "warm up"}).raise_for_status()
    model = load_model(model_path, options=LoadOptions(n_threads=1))
    embedder = open_embedder(model)
    llm = llama_cpp.Llama(
        str(model_path),
        embedding=True,
        pooling_type=-1 if embedder.pooling_from_file else llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        n_ctx=embedder.n_ctx,
        n_batch=embedder.n_ctx,
        n_ubatch=embedder.n_ctx,
        n_threads=1,
        verbose=False,
    )
    http_ms: list[float] = []
    ours_ms: list[float] = []
    raw_ms: list[float] = []
    errs_ours: list[float] = []
    errs_raw: list[float] = []
    for i in range(n):
        text = TEXTS[i % len(TEXTS)]
        t0 = time.perf_counter()
        r = client.post("/api/embed", json={"model": "bench", "input": text})
        http_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        vec, _ = embedder.embed(text)
        ours = normalize(vec)
        ours_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        raw = np.asarray(llm.embed(text))
        raw_ms.append((time.perf_counter() - t0) * 1000)
        got = np.asarray(r.json()["embeddings"][0])
        errs_ours.append(rel_l2(got, ours))
        errs_raw.append(rel_l2(got, raw / np.linalg.norm(raw)))
    print(f"embed, one text per call, p50 of {n} (model {model_path.name}, 1 thread):")
    print(f"  http /api/embed        {p50(http_ms):8.2f} ms")
    print(f"  mmchat in-process      {p50(ours_ms):8.2f} ms")
    print(f"  llama-cpp-python       {p50(raw_ms):8.2f} ms")
    print(f"  http - in-process      {p50(http_ms) - p50(ours_ms):8.2f} ms")
    print(
        f"  max rel L2 of the http vectors: vs in-process {max(errs_ours):.1e}, vs "
        f"llama-cpp-python {max(errs_raw):.1e} (its default flash attention/KV settings differ)"
    )
    batch = TEXTS[:32]
    t0 = time.perf_counter()
    client.post("/api/embed", json={"model": "bench", "input": batch}).raise_for_status()
    http_b = time.perf_counter() - t0
    t0 = time.perf_counter()
    for text in batch:
        embedder.embed(text)
    ours_b = time.perf_counter() - t0
    print(
        f"embed, 32 texts in one request: http {http_b * 1000:.1f} ms, in-process "
        f"{ours_b * 1000:.1f} ms ({32 / http_b:.0f} vs {32 / ours_b:.0f} texts/s)"
    )
    llm.close()
    embedder.close()
    model.close()


def bench_upload(url: str, mib: int, folder: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        print("upload: skipped (no curl)")
        return
    data = os.urandom(mib << 20)
    src = folder / "upload.bin"
    src.write_bytes(data)
    t0 = time.perf_counter()
    digest = hashlib.sha256(data).hexdigest()
    with (folder / "copy.bin").open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    floor = time.perf_counter() - t0
    del data
    t0 = time.perf_counter()
    code = subprocess.run(
        [
            curl,
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-T",
            str(src),
            "-X",
            "POST",
            f"{url}/api/blobs/sha256:{digest}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    took = time.perf_counter() - t0
    print(
        f"upload {mib} MiB: HTTP {code}, {mib / took:.0f} MiB/s by curl; sha256+write+fsync "
        f"in-process {mib / floor:.0f} MiB/s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF (default: the tiny test fixture)")
    ap.add_argument("--n", type=int, default=100, help="single-text requests to time")
    ap.add_argument("--upload-mib", type=int, default=256)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from support.models import converted

        model = converted("llava15_hf")[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        from mmchat.store import Store

        Store(folder / "home").register("bench", model=model)
        proc, url = start_server(folder / "home")
        try:
            bench_embed(url, model, args.n)
            bench_upload(url, args.upload_mib, folder)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
