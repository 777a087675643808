"""`mmchat run`: chat with a model interactively, or answer one prompt and exit."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import typer

from mmchat.cli.app import app
from mmchat.cli.rpc import RPC_HELP, TENSOR_SPLIT_HELP, describe_workers, use_workers


@app.command(
    context_settings={"allow_interspersed_args": True},
    epilog=(
        "Inside the chat, name image files anywhere in a message "
        "(What is this? ./photo.jpg) and type /? for commands."
    ),
)
def run(
    model: str = typer.Argument(
        ..., metavar="MODEL", help="Store name (pulled when missing) or path to a text .gguf."
    ),
    prompt: list[str] | None = typer.Argument(
        None,
        metavar="PROMPT",
        help="Answer this prompt and exit (image paths in it are attached).",
        show_default=False,
    ),
    mmproj: Path | None = typer.Option(
        None, "--mmproj", help="Projector (mmproj) .gguf for a model given as a path."
    ),
    image: list[str] | None = typer.Option(
        None, "--image", "-i", help="Attach an image (repeatable).", show_default=False
    ),
    audio: list[str] | None = typer.Option(
        None,
        "--audio",
        help="Attach an audio clip: .wav, .mp3 or .flac (repeatable).",
        show_default=False,
    ),
    system: str | None = typer.Option(None, "--system", "-s", help="System prompt."),
    ctx: int | None = typer.Option(
        None, "--ctx", min=16, help="Context size in tokens (default: min(4096, trained context))."
    ),
    gpu_layers: int | None = typer.Option(
        None,
        "--gpu-layers",
        help="Layers to offload to the GPU (default: all when one is present).",
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="CPU threads (default: every CPU this process may use)."
    ),
    rpc: str | None = typer.Option(None, "--rpc", help=RPC_HELP, show_default=False),
    tensor_split: str | None = typer.Option(
        None, "--tensor-split", help=TENSOR_SPLIT_HELP, show_default=False
    ),
    temperature: float | None = typer.Option(
        None, "--temperature", help="Sampling temperature; 0 is greedy (default 0.8)."
    ),
    top_p: float | None = typer.Option(
        None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (default 0.9)."
    ),
    top_k: int | None = typer.Option(
        None, "--top-k", min=0, help="Top-k sampling, 0 = off (default 40)."
    ),
    repeat_penalty: float | None = typer.Option(
        None, "--repeat-penalty", help="Penalty for repeated tokens (default 1.1)."
    ),
    seed: int | None = typer.Option(
        None, "--seed", min=0, max=2**32 - 1, help="Sampling seed: same seed, same output."
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", min=0, help="Stop a reply after this many tokens (default: no limit)."
    ),
    format: str | None = typer.Option(
        None, "--format", help="Constrain replies: json.", show_default=False
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Print load time and per-reply timings."
    ),
    markdown: bool = typer.Option(
        True, "--markdown/--plain", help="Render replies as Markdown on a terminal, or plain."
    ),
    wordwrap: bool = typer.Option(
        True, "--wordwrap/--nowordwrap", help="Wrap plain replies at word boundaries."
    ),
) -> None:
    """Chat with a model (MODEL PROMPT: answer once; piped stdin is read)."""
    from mmchat.console import err, out
    from mmchat.errors import UserError
    from mmchat.repl import loader
    from mmchat.repl.chat import Chat, Display
    from mmchat.settings import load_settings

    settings = load_settings()
    text = " ".join(prompt or []).strip() or None
    piped: str | None = None
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
    interactive = text is None and not image and not audio and piped is None
    if format not in (None, "json"):
        raise UserError(f"unknown format {format!r} (only json is supported)")
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "repeat_penalty": repeat_penalty,
            "seed": seed,
            "max_tokens": max_tokens,
            "format": format,
        }.items()
        if v is not None
    }

    try:
        from mmchat.runtime.options import LoadOptions

        options = LoadOptions(n_ctx=ctx, n_gpu_layers=gpu_layers, n_threads=threads, seed=seed)
        # RPC workers are probed first: before a pull, and before llama.cpp sees them
        workers = use_workers(rpc, tensor_split, options)
        source = loader.resolve_model(model, mmproj=mmproj, console=err)
        from mmchat.memory import available_memory, describe, estimate

        need = estimate(source.model_path, source.mmproj_path, n_ctx=ctx or 4096)
        free = available_memory()
        if verbose or (free is not None and need.total > free):  # said before loading
            err.print(f"{source.name} {describe(need, free)}", style="dim", highlight=False)
        t_load = time.perf_counter()
        if interactive:
            _preload_prompt()
        with loader.spinner(err, f"Loading {source.name}..."):
            # the runtime (numpy, llama.cpp) is imported here, under the spinner
            loaded = loader.load(source, options, console=None)
        if verbose and workers:
            err.print(describe_workers(workers), style="dim", highlight=False)
        load_ms = (time.perf_counter() - t_load) * 1000  # llama.cpp's start-up included
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    try:
        params = loader.sampling_for(source).updated(**overrides)
        session = loaded.session(system=system or source.system, params=params)
        if verbose:
            err.print(f"load duration:        {load_ms:.1f} ms", style="dim", highlight=False)

        def opener(ref: str, mm: str | None) -> tuple[loader.ModelSource, Any]:
            src = loader.resolve_model(ref, mmproj=Path(mm) if mm else None, console=err)
            return src, loader.load(src, options, console=err)

        chat = Chat(
            model=loaded,
            session=session,
            out=out,
            err=err,
            name=source.name,
            display=Display(verbose=verbose, markdown=markdown, wordwrap=wordwrap),
            max_image_pixels=settings.max_image_pixels,
            opener=opener,
            load_options=options,
        )
        if interactive:
            from mmchat.repl.app import run_repl

            output = None
            if not sys.stdout.isatty():  # keep stdout for the replies only
                from prompt_toolkit.output import create_output

                output = create_output(stdout=sys.stderr)
            run_repl(chat, history_file=settings.history_file, output=output)
            return
        from mmchat.repl.oneshot import run_once

        chat.notices = err
        code = run_once(chat, text, piped=piped, images=list(image or []), audio=list(audio or []))
        if code:
            raise typer.Exit(code)
    finally:
        chat_model = locals().get("chat")
        (chat_model.model if chat_model is not None else loaded).close()


def _preload_prompt() -> None:
    """Import the prompt (prompt_toolkit) on a thread while the model loads: llama.cpp
    loads without holding the GIL, so the prompt then appears sooner after the load."""
    import contextlib
    import threading

    def work() -> None:
        # on failure the main thread imports it again and reports the error
        with contextlib.suppress(Exception):
            import mmchat.repl.app  # noqa: F401

    threading.Thread(target=work, name="mmchat-preload", daemon=True).start()
