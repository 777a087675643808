"""`mmchat serve`: the Ollama- and OpenAI-compatible HTTP API (see ``mmchat.server``)."""

from __future__ import annotations

import ipaddress
import logging
import socket

import typer

from mmchat.cli.app import app
from mmchat.cli.rpc import RPC_HELP, TENSOR_SPLIT_HELP, describe_workers, use_workers
from mmchat.console import out, print_warning
from mmchat.errors import UserError


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]").lower()
    if name in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def bind_warning(host: str, api_key: str | None) -> str | None:
    """The warning printed for a bind that other machines can reach, or None."""
    if is_loopback(host):
        return None
    if api_key:
        return (
            f"listening on {host}, reachable from other machines; requests need the API key, "
            "but traffic is plain HTTP (put a TLS proxy in front for untrusted networks)"
        )
    return (
        f"listening on {host}, reachable from other machines, and without an API key anyone "
        "who can reach it can use your models: set --api-key or MMCHAT_API_KEY"
    )


def open_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port); UserError if taken."""
    try:
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets with that proto,
        # and without it each response body waits ~40 ms behind its headers (Nagle)
        infos = socket.getaddrinfo(
            host.strip("[]"),
            port,
            type=socket.SOCK_STREAM,
            proto=socket.IPPROTO_TCP,
            flags=socket.AI_PASSIVE,
        )
    except socket.gaierror as exc:
        raise UserError(f"cannot listen on {host}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


@app.command()
def serve(
    host: str = typer.Option(
        None, "--host", help="Address to listen on. Default: MMCHAT_HOST or 127.0.0.1."
    ),
    port: int = typer.Option(
        None, "--port", "-p", help="Port (0: any free port). Default: MMCHAT_HOST's or 11435."
    ),
    api_key: str = typer.Option(
        None,
        "--api-key",
        help="Require 'Authorization: Bearer KEY' on every request. Default: MMCHAT_API_KEY.",
        show_default=False,
    ),
    keep_alive: str = typer.Option(
        None,
        "--keep-alive",
        help="How long an idle model stays loaded ('5m', '90s', seconds; -1: forever). "
        "Default: MMCHAT_KEEP_ALIVE or 5m.",
    ),
    max_loaded: int = typer.Option(3, "--max-loaded", help="Models kept loaded at once."),
    ctx: int = typer.Option(
        None, "--ctx", help="Context size for loaded models (a request's num_ctx wins)."
    ),
    threads: int = typer.Option(
        None, "--threads", help="CPU threads per model (default: every CPU this process may use)."
    ),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest request body (MiB)."),
    max_images: int = typer.Option(16, "--max-images", help="Most images in one request."),
    parallel: int = typer.Option(
        None,
        "--parallel",
        min=1,
        help="Replies each model produces at once (continuous batching). Default: "
        "MMCHAT_NUM_PARALLEL, else up to 4 by the model's size, the context and free memory.",
    ),
    max_queue: int = typer.Option(
        64, "--max-queue", min=0, help="Requests waiting per model before 503."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request."),
    rpc: str | None = typer.Option(None, "--rpc", help=RPC_HELP, show_default=False),
    tensor_split: str | None = typer.Option(
        None, "--tensor-split", help=TENSOR_SPLIT_HELP, show_default=False
    ),
) -> None:
    """Serve the models over HTTP: Ollama's API (/api/...) and OpenAI's (/v1/...)."""
    import uvicorn

    from mmchat.runtime import LoadOptions
    from mmchat.server import Limits, ModelManager, create_app
    from mmchat.server.errors import ApiError
    from mmchat.server.models import parse_keep_alive
    from mmchat.settings import load_settings

    settings = load_settings()
    host = host or settings.host
    port = settings.port if port is None else port
    key = api_key or settings.api_key
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    if max_loaded < 1 or max_images < 0 or max_body_mb <= 0:
        raise UserError("--max-loaded must be ≥ 1, --max-images ≥ 0 and --max-body-mb > 0")
    try:
        keep = parse_keep_alive(keep_alive, settings.keep_alive_s)
    except ApiError as exc:
        raise UserError(f"--keep-alive: {exc.message}") from None
    options = LoadOptions(n_ctx=ctx, n_threads=threads, max_queue=max_queue)
    # probed before any model loads; each model attaches them in a process of its own
    workers = use_workers(rpc, tensor_split, options, attach=False)
    n_parallel = parallel or settings.num_parallel  # None: per model, by free memory
    options.validate()
    limits = Limits(
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_images=max_images,
        max_image_pixels=settings.max_image_pixels,
    )
    loader = None
    if workers:  # llama.cpp aborts the process that loses a worker: not the server's
        from functools import partial

        from mmchat.server.host import HostedModel

        loader = partial(HostedModel, endpoints=[w.endpoint for w in workers])
    manager = ModelManager(
        keep_alive_s=-1.0 if keep is None else keep,
        max_loaded=max_loaded,
        parallel=n_parallel,
        load_options=options,
        loader=loader,
    )
    application = create_app(manager, api_key=key, limits=limits)

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mmchat.server").setLevel(logging.INFO if verbose else logging.WARNING)
    warning = bind_warning(host, key)
    if warning:
        print_warning(warning)
    sock = open_socket(host, port)
    url = _url(sock)
    if workers:
        out.print(describe_workers(workers), markup=False, highlight=False, soft_wrap=True)
    out.print(
        f"mmchat is listening on {url} (Ollama API: {url}/api, OpenAI API: {url}/v1"
        f"{', API key required' if key else ''}; "
        + (
            f"{n_parallel} replies at once per model"
            if n_parallel
            else "replies at once per model: up to 4, by free memory"
        )
        + "); Ctrl+C stops it",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    config = uvicorn.Config(
        application,
        log_level="info" if verbose else "warning",
        access_log=verbose,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[sock])
