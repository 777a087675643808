"""Pull throughput: `mmchat pull` against a plain `curl` of the same file, side by side.

Both fetch the same GGUF from the local fake hub (tests/support/fakehub.py, loopback,
served with sendfile from its own process) and write it to the same filesystem. mmchat
also hashes every byte (sha256, while downloading), verifies it against the hub's LFS
digest and fsyncs the blob; curl does none of that.

    .venv/bin/python benchmarks/pull.py --size-mib 1024 --repeats 3

Three numbers per round, interleaved so that machine load hits all of them alike:
* curl: ``curl -sS -f -o FILE URL``;
* mmchat (process): ``python -m mmchat pull hf.co/bench/Big-GGUF`` in a fresh process
  (start-up, repository listing, download, verification, manifest);
* mmchat (in-process): ``Puller.pull`` alone (listing, download, verification, manifest);
  the time its closing ``fsync`` calls take is reported separately.
Goal: mmchat >= 80% of curl's throughput.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.fakehub import FakeHub, write_mmproj_gguf, write_text_gguf  # noqa: E402

REPO = "bench/Big-GGUF"
FILE = "big-Q4_K_M.gguf"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(paths: list[str]) -> None:
    """Run the fake hub in this process until stdin closes (keeps it off the client's CPU)."""
    with FakeHub() as hub:
        hub.add_repo(REPO, {Path(p).name: Path(p) for p in paths})
        print(hub.url, flush=True)
        sys.stdin.read()


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512, help="size of the text GGUF")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    args = ap.parse_args()

    load_before = " ".join(map(str, os.getloadavg()))
    work = Path(tempfile.mkdtemp(prefix="mmchat-bench-", dir=args.workdir))
    try:
        big = write_text_gguf(work / FILE, pad_bytes=args.size_mib * 1024 * 1024)
        mmproj = write_mmproj_gguf(work / "mmproj-big-f16.gguf")
        size = big.stat().st_size
        results: dict[str, list[float]] = {"curl": [], "process": [], "in-process": []}
        cpu: dict[str, list[float]] = {"curl": [], "process": [], "in-process": []}
        fsync_s: list[float] = []
        hub_cpu: dict[str, list[float]] = {"curl": [], "process": [], "in-process": []}
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(big), str(mmproj)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            hub_url = server.stdout.readline().strip()
            url = f"{hub_url}/{REPO}/resolve/main/{FILE}"
            env = dict(os.environ, HF_ENDPOINT=hub_url, HF_HOME=str(work / "hf"))
            for _ in range(args.repeats):
                # curl
                out = work / "curl.out"
                h0 = _proc_cpu(server.pid)
                c0 = _children_cpu()
                t0 = time.perf_counter()
                subprocess.run(["curl", "-sS", "-f", "-o", str(out), url], check=True)
                results["curl"].append(size / (time.perf_counter() - t0))
                cpu["curl"].append(_children_cpu() - c0)
                hub_cpu["curl"].append(_proc_cpu(server.pid) - h0)
                assert out.stat().st_size == size
                out.unlink()

                # mmchat pull, a fresh process
                home = work / "home-proc"
                h0 = _proc_cpu(server.pid)
                c0 = _children_cpu()
                t0 = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "mmchat", "pull", f"hf.co/{REPO}"],
                    check=True,
                    env=dict(env, MMCHAT_HOME=str(home)),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                results["process"].append(size / (time.perf_counter() - t0))
                cpu["process"].append(_children_cpu() - c0)
                hub_cpu["process"].append(_proc_cpu(server.pid) - h0)
                shutil.rmtree(home)

                # mmchat pull, in-process (no interpreter start-up)
                from mmchat.hub import Puller
                from mmchat.store import open_store

                home = work / "home-lib"
                fsync_s.append(0.0)
                real_fsync = os.fsync

                def timed_fsync(fd: int, _real=real_fsync) -> None:
                    t = time.perf_counter()
                    _real(fd)
                    fsync_s[-1] += time.perf_counter() - t

                os.fsync = timed_fsync
                h0 = _proc_cpu(server.pid)
                c0 = time.process_time()
                t0 = time.perf_counter()
                rec = Puller(open_store(home), endpoint=hub_url, hf_cache=work / "hf").pull(
                    f"hf.co/{REPO}"
                )
                results["in-process"].append(size / (time.perf_counter() - t0))
                cpu["in-process"].append(time.process_time() - c0)
                os.fsync = real_fsync
                hub_cpu["in-process"].append(_proc_cpu(server.pid) - h0)
                assert rec.model_path.stat().st_size == size
                shutil.rmtree(home)
        finally:
            if server.stdin is not None:
                server.stdin.close()
            server.wait(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mib = 1024 * 1024
    gib = 1024 * mib
    curl = statistics.median(results["curl"])
    print(f"machine: {_cpu()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"load average before/after: {load_before} / {' '.join(map(str, os.getloadavg()))}")
    print(f"file: {size / mib:.0f} MiB GGUF, loopback fake hub, {args.repeats} rounds (median)")
    print()
    print(
        "| client | MiB/s (median) | runs (MiB/s) | vs curl | CPU s per GiB (median) "
        "| fake hub CPU s per GiB |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    labels = {
        "curl": "curl -o",
        "process": "mmchat pull (new process)",
        "in-process": "mmchat Puller.pull (in-process)",
    }
    for key, label in labels.items():
        med = statistics.median(results[key])
        runs = ", ".join(f"{v / mib:.0f}" for v in results[key])
        cpu_gib = statistics.median(cpu[key]) / (size / gib)
        hub_gib = statistics.median(hub_cpu[key]) / (size / gib)
        print(
            f"| {label} | {med / mib:.0f} | {runs} | {med / curl:.0%} | {cpu_gib:.2f} "
            f"| {hub_gib:.2f} |"
        )
    print()
    runs = ", ".join(f"{v:.2f}" for v in fsync_s)
    print(f"in-process: time in fsync (blob + manifest) per pull, s: {runs}")


if __name__ == "__main__":
    main()
