"""The price of the network hop: one model local vs split over two loopback RPC workers.

    python benchmarks/rpc_split.py                       # the llava15_hf test fixture
    python benchmarks/rpc_split.py --model M.gguf --prompt 256 --decode 64 --threads 1

Needs llama-cpp-python built with ``-DGGML_RPC=on``. Starts two ``mmchat rpc-worker``
processes on 127.0.0.1 (CPU device, ``--threads`` each) and measures, each in a fresh
process (RPC devices are registered per process):

- **local**: every layer on this process's CPU;
- **split**: ``--gpu-layers`` of the model's layers (default: all) on the two workers,
  ``--tensor-split 1,1``;
- **split, counted**: the same through a byte-counting TCP relay in front of each worker,
  giving the bytes sent and received per prompt token and per generated token (the relay
  adds its own latency, so its timings are not reported).

Prompt tokens/s: one ``evaluate_ids`` of ``--prompt`` token ids; decode tokens/s: ``--decode``
greedy single-token steps after it. Median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from mmchat.runtime import LoadOptions, load_model
    from mmchat.runtime import rpc

    path, endpoints, n_prompt, n_decode, threads, layers, repeat = sys.argv[1:8]
    n_prompt, n_decode, repeat = int(n_prompt), int(n_decode), int(repeat)
    opts = LoadOptions(n_ctx=max(64, n_prompt + n_decode + 8), n_threads=int(threads),
                       n_batch=max(512, n_prompt))
    if endpoints != "-":
        rpc.attach(rpc.parse_endpoints(endpoints))
        opts.n_gpu_layers = int(layers)
        opts.tensor_split = (1.0, 1.0)
    else:
        opts.n_gpu_layers = 0

    def phase(name):  # let the parent read the relay's counters between phases
        print("PHASE " + name, flush=True)
        sys.stdin.readline()

    with load_model(path, options=opts) as m:
        rng = np.random.default_rng(0)
        ids = [int(x) for x in rng.integers(3, m.n_vocab, n_prompt)]
        out = {"prompt_s": [], "decode_s": []}
        for _ in range(repeat):
            phase("prompt")
            t0 = time.perf_counter()
            ev = m.evaluate_ids([ids])
            out["prompt_s"].append(time.perf_counter() - t0)
            tok = int(np.argmax(ev.logits))
            phase("decode")
            t0 = time.perf_counter()
            for _ in range(n_decode):
                m.decode_token(tok)
                tok = int(np.argmax(m.logits()))
            out["decode_s"].append(time.perf_counter() - t0)
        phase("end")
        print("RESULT " + json.dumps(out), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Relay:
    """A TCP relay 127.0.0.1:port → target that counts the bytes each way."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sent = 0  # client → worker
        self.received = 0  # worker → client
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.srv.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                if up:
                    self.sent += len(data)
                else:
                    self.received += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def _worker(port: int, threads: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmchat",
            "rpc-worker",
            "--port",
            str(port),
            "--threads",
            str(threads),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "serving" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining
            return proc
    raise RuntimeError(f"worker on {port} did not start")


def _measure(args: argparse.Namespace, endpoints: str, relays: list[Relay]) -> dict:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(args.model),
            endpoints,
            str(args.prompt),
            str(args.decode),
            str(args.threads),
            str(args.gpu_layers),
            str(args.repeat),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    traffic: dict[str, list[int]] = {"prompt": [0, 0], "decode": [0, 0]}
    current: str | None = None
    mark = (0, 0)
    result: dict = {}
    for line in proc.stdout:
        if line.startswith("PHASE "):
            now = (sum(r.sent for r in relays), sum(r.received for r in relays))
            if current in traffic:
                traffic[current][0] += now[0] - mark[0]
                traffic[current][1] += now[1] - mark[1]
            current, mark = line.split()[1], now
            proc.stdin.write("go\n")
            proc.stdin.flush()
        elif line.startswith("RESULT "):
            result = json.loads(line[7:])
    if proc.wait() != 0 or not result:
        raise RuntimeError("the measuring process failed")
    result["traffic"] = traffic
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gpu-layers", type=int, default=-1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from mmchat.runtime import rpc

    if not rpc.rpc_available():
        sys.exit(rpc.NO_RPC_MESSAGE)
    if args.model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from support.models import converted

        args.model, _ = converted("llava15_hf")
    ports = [_free_port(), _free_port()]
    workers = [_worker(p, args.threads) for p in ports]
    try:
        local = _measure(args, "-", [])
        split = _measure(args, ",".join(f"127.0.0.1:{p}" for p in ports), [])
        relays = [Relay(p) for p in ports]
        counted = _measure(args, ",".join(f"127.0.0.1:{r.port}" for r in relays), relays)
    finally:
        for w in workers:
            w.terminate()
            w.wait()
    n = args.repeat
    rows = []
    for name, res in (("local", local), ("split over 2 loopback workers", split)):
        p = statistics.median(res["prompt_s"])
        d = statistics.median(res["decode_s"])
        rows.append(f"| {name} | {args.prompt / p:.1f} | {args.decode / d:.1f} |")
    up_p, down_p = counted["traffic"]["prompt"]
    up_d, down_d = counted["traffic"]["decode"]
    print(
        f"model {args.model.name}, {args.prompt} prompt tokens, {args.decode} decoded, "
        f"{args.threads} thread(s) per process, median of {n}"
    )
    print("| | prompt tokens/s | decode tokens/s |\n| --- | --- | --- |")
    print("\n".join(rows))
    print(
        f"bytes per prompt token: {up_p / (n * args.prompt):.0f} sent, "
        f"{down_p / (n * args.prompt):.0f} received; per generated token: "
        f"{up_d / (n * args.decode):.0f} sent, {down_d / (n * args.decode):.0f} received"
    )


if __name__ == "__main__":
    main()
