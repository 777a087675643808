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
concurrent clients; a model serves one request at a time, so 8 clients queue. With one
client the paths take turns request by request (http, http streamed, in-process, a bare
``GET /api/version``, llama-cpp-python), so that the load of a shared machine hits them
alike; with 8 clients each path runs on its own.

The headline HTTP overhead per request is p50(http) - p50(in-process) for the same
requests measured side by side: everything the server does that the in-process call does
not (HTTP, JSON, validation, base64, the store lookup, the hops to the worker thread and
back). A second view is client latency minus the server's own ``total_duration`` (what the
server does before and after it starts the clock: HTTP parsing, validation, sending), and
the floor is a bare ``GET /api/version`` on a keep-alive connection of its own.

    .venv/bin/python benchmarks/serve.py                      # tiny fixture model
    .venv/bin/python benchmarks/serve.py --model M.gguf --mmproj P.gguf --ctx 2048
    .venv/bin/python benchmarks/serve.py --server-cmd "other/python -m mmchat"  # compare
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import platform
import queue
import shlex
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


def measure_turns(calls: dict[str, Callable[[int], float | None]], n: int) -> dict[str, Run]:
    """One client: for i < n, every path answers request i in turn (the order rotating),
    so that a shared machine's changing load falls on all paths alike."""
    runs = {name: Run() for name in calls}
    names = list(calls)
    for i in range(n):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            overhead = calls[name](i)
            ms = (time.perf_counter() - t0) * 1000
            run = runs[name]
            run.latencies_ms.append(ms)
            run.wall_s += ms / 1000
            if overhead is not None:
                run.overheads_ms.append(ms - overhead)
    return runs


# ----------------------------------------------------------------------------- http
def start_server(
    home: Path,
    ctx: int,
    threads: int | None,
    server_cmd: str | None,
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, MMCHAT_HOME=str(home), MMCHAT_KEEP_ALIVE="-1")
    env.pop("MMCHAT_API_KEY", None)
    mmchat = shlex.split(server_cmd) if server_cmd else [sys.executable, "-m", "mmchat"]
    cmd = [*mmchat, "serve", "--port", "0", "--ctx", str(ctx), *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split("listening on ", 1)[1].split(" ", 1)[0]


def http_call(
    url: str, image_b64: str | None, stream: bool = False
) -> Callable[[int], float | None]:
    import json

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
        body = {
            "model": "bench",
            "messages": [msg],
            "stream": stream,
            "options": {"temperature": 0, "seed": 1, "num_predict": NEW_TOKENS},
        }
        if not stream:
            r = client.post("/api/chat", json=body)
            r.raise_for_status()
            return float(r.json()["total_duration"]) / 1e6
        last = ""
        with client.stream("POST", "/api/chat", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                last = line or last
        return float(json.loads(last)["total_duration"]) / 1e6

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
    ap.add_argument(
        "--server-cmd",
        help="the command that runs mmchat for the server (default: this Python -m mmchat)",
    )
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

    proc, url = start_server(home, args.ctx, args.threads, args.server_cmd)
    results: dict[tuple[str, str, int], Run] = {}
    try:
        import httpx

        version_client = httpx.Client(base_url=url)

        def version(i: int) -> None:
            version_client.get("/api/version").raise_for_status()

        measure(version, 20, 1)
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
        floors: list[Run] = []
        for work, n in (("text", args.requests), ("image", args.image_requests)):
            img = work == "image"
            paths: dict[str, Callable[[int], float | None]] = {
                "http": http_call(url, image_b64 if img else None),
                "http streamed": http_call(url, image_b64 if img else None, stream=True),
                "mmchat in-process": mmchat_call(model, image_bytes if img else None),
            }
            if llm is not None:
                paths["llama-cpp-python"] = llama_cpp_call(llm, uri if img else None)
            for call in paths.values():
                with quiet_stderr():
                    measure(call, 16, 8)  # warm-up: load, first image, caches, connections
            with quiet_stderr():
                turns = measure_turns({**paths, "GET /api/version": version}, n)
            floors.append(turns.pop("GET /api/version"))
            for name, run in turns.items():
                results[(work, name, 1)] = run
            for name, call in paths.items():
                if name == "http streamed":
                    continue
                with quiet_stderr():
                    results[(work, name, 8)] = measure(call, n, 8)
        version_client.close()
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
    floor = Run(latencies_ms=[ms for f in floors for ms in f.latencies_ms])
    print()
    print(
        f"HTTP floor on this machine, taking turns with the requests above: GET /api/version "
        f"on a keep-alive connection, p50 {floor.pct(floor.latencies_ms, 50):.2f} ms, "
        f"p99 {floor.pct(floor.latencies_ms, 99):.2f} ms ({len(floor.latencies_ms)} requests)"
    )
    print()
    print(
        "| work | clients | path | HTTP overhead: p50(http) - p50(in-process) ms "
        "| p50(latency - server total_duration) ms | p99 ms |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for work in ("text", "image"):
        for clients in (1, 8):
            m = results[(work, "mmchat in-process", clients)]
            for name in ("http", "http streamed"):
                h = results.get((work, name, clients))
                if h is None:
                    continue
                diff = h.pct(h.latencies_ms, 50) - m.pct(m.latencies_ms, 50)
                print(
                    f"| {work} | {clients} | {name} | {diff:.2f} | "
                    f"{h.pct(h.overheads_ms, 50):.2f} | {h.pct(h.overheads_ms, 99):.2f} |"
                )


if __name__ == "__main__":
    main()
