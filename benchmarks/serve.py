"""HTTP serving cost: `mmchat serve` against the same work in-process, side by side.

Three ways to answer the same requests with the same model files:
* http: `mmchat serve` in its own process, driven over loopback by httpx clients
  (``POST /api/chat``, ``"stream": false``, image as base64), one keep-alive connection
  per client;
* mmchat in-process: the runtime the server uses, called directly (a session per
  request, image decoded from the same bytes per request), no HTTP;
* llama-cpp-python: ``Llama.create_chat_completion`` in-process (its LLaVA 1.5 chat handler
  for images, data URI), the raw library mmchat is built on.

Workloads: a short text completion (a different question each time, 8 new tokens, greedy)
and an image question (the same image each time, a different question). 1 and 8
concurrent clients; a model serves one request at a time, so 8 clients queue.

The HTTP overhead per request is measured two ways: client latency minus the server's own
``total_duration`` for that request (what HTTP, JSON, base64 and the hop to the worker
thread cost), and p50(http) - p50(in-process).

    .venv/bin/python benchmarks/serve.py                      # tiny fixture model
    .venv/bin/python benchmarks/serve.py --model M.gguf --mmproj P.gguf --ctx 2048
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
IMAGE = ROOT / "tests" / "fixtures" / "images" / "landscape.png"
NEW_TOKENS = 8


@dataclass
class Run:
    latencies_ms: list[float] = field(default_factory=list)
    overheads_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def pct(self, values: list[float], p: float) -> float:
        ordered = sorted(values)
        if not ordered:
            return float("nan")
        k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
        return ordered[k]

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.wall_s if self.wall_s else 0.0


def question(i: int) -> str:
    return f"Question {i}: what do you see? Answer briefly."


def measure(call: Callable[[int], float | None], n: int, clients: int) -> Run:
    """Run ``call(i)`` for i < n on ``clients`` threads; ``call`` may return an overhead."""
    run = Run()
    lock = threading.Lock()

    def one(i: int) -> None:
        t0 = time.perf_counter()
        overhead = call(i)
        ms = (time.perf_counter() - t0) * 1000
        with lock:
            run.latencies_ms.append(ms)
            if overhead is not None:
                run.overheads_ms.append(ms - overhead)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(n)))
    run.wall_s = time.perf_counter() - t0
    return run


# ----------------------------------------------------------------------------- http
def start_server(home: Path, ctx: int, threads: int | None) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, MMCHAT_HOME=str(home), MMCHAT_KEEP_ALIVE="-1")
    env.pop("MMCHAT_API_KEY", None)
    cmd = [sys.executable, "-m", "mmchat", "serve", "--port", "0", "--ctx", str(ctx)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split("listening on ", 1)[1].split(" ", 1)[0]


def http_call(url: str, image_b64: str | None) -> Callable[[int], float | None]:
    import httpx

    # made up front: creating an httpx.Client (its TLS context) costs tens of ms
    clients: queue.SimpleQueue[httpx.Client] = queue.SimpleQueue()
    for _ in range(8):
        clients.put(httpx.Client(base_url=url, timeout=300))

    def call(i: int) -> float | None:
        client = clients.get()
        try:
            return post(client, i)
        finally:
            clients.put(client)

    def post(client: httpx.Client, i: int) -> float:
        msg: dict[str, Any] = {"role": "user", "content": question(i)}
        if image_b64 is not None:
            msg["images"] = [image_b64]
        r = client.post(
            "/api/chat",
            json={
                "model": "bench",
                "messages": [msg],
                "stream": False,
                "options": {"temperature": 0, "seed": 1, "num_predict": NEW_TOKENS},
            },
        )
        r.raise_for_status()
        return float(r.json()["total_duration"]) / 1e6

    return call


# ----------------------------------------------------------------------------- in-process
def mmchat_call(model: Any, image_bytes: bytes | None) -> Callable[[int], float | None]:
    from mmchat.runtime import Message, SamplingParams
    from mmchat.vision import load_image

    params = SamplingParams(temperature=0, seed=1, max_tokens=NEW_TOKENS)

    def call(i: int) -> float | None:
        images = [load_image(image_bytes)] if image_bytes is not None else []
        session = model.session(params=params)
        session.messages = [Message("user", question(i), images)]
        for _ in session.reply():
            pass
        return None

    return call


def llama_cpp_call(llm: Any, uri: str | None) -> Callable[[int], float | None]:
    lock = threading.Lock()  # a Llama object serves one call at a time

    def call(i: int) -> float | None:
        if uri is None:
            content: Any = question(i)
        else:
            content = [
                {"type": "image_url", "image_url": {"url": uri}},
                {"type": "text", "text": question(i)},
            ]
        with lock:
            llm.create_chat_completion(
                messages=[{"role": "user", "content": content}],
                max_tokens=NEW_TOKENS,
                temperature=0,
                seed=1,
            )
        return None

    return call


@contextlib.contextmanager
def quiet_stderr() -> Any:
    """llama.cpp's mtmd prints per image even with verbose=False: silence fd 2."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", type=Path, help="text GGUF (default: the tiny llava15_hf fixture)")
    ap.add_argument("--mmproj", type=Path, help="projector GGUF")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--requests", type=int, default=40, help="text requests per row")
    ap.add_argument("--image-requests", type=int, default=24, help="image requests per row")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama-cpp-python")
    args = ap.parse_args()

    if args.model is None:
        from support.models import converted

        args.model, args.mmproj = converted("llava15_hf")
    image_bytes = IMAGE.read_bytes()
    image_b64 = base64.b64encode(image_bytes).decode()
    uri = "data:image/png;base64," + image_b64

    home = Path(tempfile.mkdtemp(prefix="mmchat-bench-serve-"))
    from mmchat.store import Store

    Store(home).register("bench", model=args.model, mmproj=args.mmproj)

    proc, url = start_server(home, args.ctx, args.threads)
    results: dict[tuple[str, str, int], Run] = {}
    try:
        import httpx

        with httpx.Client(base_url=url) as version_client:

            def version(i: int) -> None:
                version_client.get("/api/version").raise_for_status()

            floor = measure(version, 200, 1)
        from mmchat.runtime import LoadOptions, load_model

        model = load_model(
            args.model, args.mmproj, LoadOptions(n_ctx=args.ctx, n_threads=args.threads)
        )
        llm = None
        if not args.no_llama_cpp:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Llava15ChatHandler

            with quiet_stderr():
                handler = Llava15ChatHandler(clip_model_path=str(args.mmproj), verbose=False)
                llm = Llama(
                    model_path=str(args.model),
                    chat_handler=handler,
                    n_ctx=args.ctx,
                    n_threads=args.threads,
                    verbose=False,
                )
        for work, n in (("text", args.requests), ("image", args.image_requests)):
            img = work == "image"
            paths: dict[str, Callable[[int], float | None]] = {
                "http": http_call(url, image_b64 if img else None),
                "mmchat in-process": mmchat_call(model, image_bytes if img else None),
            }
            if llm is not None:
                paths["llama-cpp-python"] = llama_cpp_call(llm, uri if img else None)
            for call in paths.values():
                with quiet_stderr():
                    measure(call, 16, 8)  # warm-up: load, first image, caches, connections
            for clients in (1, 8):
                for name, call in paths.items():  # interleaved: machine load hits all alike
                    with quiet_stderr():
                        results[(work, name, clients)] = measure(call, n, clients)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)

    print(f"model: {args.model.name} + {args.mmproj.name if args.mmproj else '-'}, ctx {args.ctx}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    )
    print()
    print("| work | clients | path | req/s | p50 ms | p99 ms |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for (work, name, clients), r in results.items():
        print(
            f"| {work} | {clients} | {name} | {r.rps:.1f} | "
            f"{r.pct(r.latencies_ms, 50):.1f} | {r.pct(r.latencies_ms, 99):.1f} |"
        )
    print()
    print(
        f"HTTP floor on this machine, same conditions: GET /api/version on a keep-alive "
        f"connection, p50 {floor.pct(floor.latencies_ms, 50):.2f} ms, "
        f"p99 {floor.pct(floor.latencies_ms, 99):.2f} ms ({len(floor.latencies_ms)} requests)"
    )
    print()
    print(
        "| work | clients | HTTP overhead p50 ms (latency - server total) | p99 ms "
        "| p50(http) - p50(in-process) ms |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for work in ("text", "image"):
        for clients in (1, 8):
            h = results[(work, "http", clients)]
            m = results[(work, "mmchat in-process", clients)]
            diff = h.pct(h.latencies_ms, 50) - m.pct(m.latencies_ms, 50)
            print(
                f"| {work} | {clients} | {h.pct(h.overheads_ms, 50):.2f} | "
                f"{h.pct(h.overheads_ms, 99):.2f} | {diff:.1f} |"
            )


if __name__ == "__main__":
    main()
