"""The child process of ``mmchat rpc-worker``: ggml's RPC server, nothing else.

``python -m mmchat.runtime.rpc_worker ENDPOINT THREADS CACHE_DIR|- DEVICE...``. The server
call blocks in ``accept()`` and never returns to Python, so Python's own SIGINT handler
could not stop it: the child ignores SIGINT (the terminal sends it to the whole process
group) and the parent stops it with SIGTERM, whose default action ends the process.
"""

from __future__ import annotations

import signal
import sys


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent ends, even by SIGKILL (no orphaned server)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import os

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        return
    if os.getppid() == 1:  # the parent already ended before prctl
        sys.exit(1)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    endpoint, threads, cache, *devices = argv
    from mmchat.errors import UserError
    from mmchat.runtime import rpc

    try:
        rpc.start_server(
            endpoint,
            devices=devices,
            n_threads=int(threads),
            cache_dir=None if cache == "-" else cache,
        )
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 1  # the server returned: it could not start (ggml printed why)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
