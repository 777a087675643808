"""Parallel serving: `mmchat serve --parallel 1` against `--parallel N`, side by side.

The same model, threads and requests; 1, 2, 4 and 8 concurrent streaming clients
(``POST /api/chat``, greedy, a fixed number of new tokens each, different prompts), each
client sending its requests one after another. For every server and client count it
prints the aggregate decode rate (generated tokens / wall time of the round) and the p50 /
p95 time to first token seen by the clients, then the ratios N vs 1. Goal (issue 20): with
4 clients, >= 2.5x the aggregate tokens/s of --parallel 1 and a p95 TTFT no worse.

    .venv/bin/python benchmarks/serve_parallel.py          # a synthetic ~60M-parameter Llama
    .venv/bin/python benchmarks/serve_parallel.py --model M.gguf --parallel 4 --tokens 64

The default model is benchmarks/chat.py's: the llava15_hf fixture grown to a Llama of 768 x 8
layers (f16, random weights: greedy replies run to the token limit, so every reply has the
same length).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def start(home: Path, parallel: int, threads: int | None, ctx: int) -> tuple[Any, str]:
    from serve import start_server  # benchmarks/serve.py: the same server start-up

    return start_server(home, ctx, threads, None, ("--parallel", str(parallel)))


def stream_once(url: str, model: str, prompt: str, tokens: int) -> tuple[float, int, float]:
    """(seconds to first token, tokens generated, total seconds) of one streamed reply."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "options": {"temperature": 0, "num_predict": tokens, "seed": 1},
    }
    t0 = time.perf_counter()
    first = 0.0
    count = 0
    with httpx.stream("POST", url + "/api/chat", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line:
                continue
            item = json.loads(line)
            if item.get("done"):
                count = int(item.get("eval_count", 0))
            elif not first and item.get("message", {}).get("content"):
                first = time.perf_counter() - t0
    return first, count, time.perf_counter() - t0


def round_of(url: str, model: str, clients: int, per_client: int, tokens: int) -> dict[str, Any]:
    ttfts: list[float] = []
    generated = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(per_client):
            prompt = f"Tell me a long story number {c * 100 + k} about shapes and colours."
            # (different prompts, so no request reuses another's KV prefix)
            first, n, _ = stream_once(url, model, prompt, tokens)
            with lock:
                ttfts.append(first)
                generated[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts.sort()
    p95 = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]
    return {
        "tok_s": generated[0] / wall,
        "p50_ttft_ms": statistics.median(ttfts) * 1000,
        "p95_ttft_ms": p95 * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", type=Path, help="text GGUF (default: the demo model, converted)")
    ap.add_argument("--mmproj", type=Path)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per reply")
    ap.add_argument("--per-client", type=int, default=2, help="requests per client per round")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "mmchat-bench-models",
        help="where the synthetic model is written (kept for the next run)",
    )
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mmchat-bench-par-"))
    from mmchat.store import Store

    store = Store(home)
    if args.model is None:
        from chat import convert_model, scaled_fixture

        args.workdir.mkdir(parents=True, exist_ok=True)
        src = scaled_fixture(args.workdir, hidden=768, layers=8, ffn=2048, heads=12)
        model, mmproj = convert_model(src, args.workdir, "f16")
    else:
        model, mmproj = args.model, args.mmproj
    store.register("bench", model=model, mmproj=mmproj)

    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}"
    )
    print(f"model: {model} ({model.stat().st_size / 2**20:.1f} MiB), {args.tokens} new tokens")
    results: dict[int, dict[int, dict[str, Any]]] = {}
    for parallel in (1, args.parallel):
        proc, url = start(home, parallel, args.threads, args.ctx)
        try:
            stream_once(url, "bench", "warm up", 4)
            results[parallel] = {}
            for clients in (1, 2, 4, 8):
                results[parallel][clients] = round_of(
                    url, "bench", clients, args.per_client, args.tokens
                )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    one, many = results[1], results[args.parallel]
    print(
        f"\n{'clients':>7} | {'tok/s p1':>9} {'tok/s pN':>9} {'ratio':>6} | "
        f"{'p50 TTFT p1':>11} {'pN':>8} | {'p95 TTFT p1':>11} {'pN':>8}  (ms)"
    )
    for clients in (1, 2, 4, 8):
        a, b = one[clients], many[clients]
        ratio = b["tok_s"] / a["tok_s"]
        print(
            f"{clients:>7} | {a['tok_s']:>9.1f} {b['tok_s']:>9.1f} {ratio:>6.2f} | "
            f"{a['p50_ttft_ms']:>11.0f} {b['p50_ttft_ms']:>8.0f} | "
            f"{a['p95_ttft_ms']:>11.0f} {b['p95_ttft_ms']:>8.0f}"
        )


if __name__ == "__main__":
    main()
