"""The typer application object. Command modules register themselves on it."""

from __future__ import annotations

import typer

from mmchat import __version__

app = typer.Typer(
    name="mmchat",
    help="Chat with multimodal (vision + text) language models on your own machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmchat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show full tracebacks for errors.", envvar="MMCHAT_DEBUG"
    ),
) -> None:
    """Chat with multimodal (vision + text) language models on your own machine."""
    state["debug"] = debug


state: dict[str, bool] = {"debug": False}
