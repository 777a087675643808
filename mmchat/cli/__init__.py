"""Command-line interface: a thin layer over mmchat's library modules.

Each command lives in its own module and registers itself on :data:`app`;
:func:`main` turns :class:`~mmchat.errors.UserError` into one red line and exit 2.
"""

from __future__ import annotations

import sys

# Command modules register themselves on import; keep this list sorted.
from mmchat.cli import client as _client  # noqa: F401  (registers `ps` and `stop`)
from mmchat.cli import convert as _convert  # noqa: F401  (registers `convert`)
from mmchat.cli import doctor as _doctor  # noqa: F401  (registers `doctor`)
from mmchat.cli import rpc as _rpc  # noqa: F401  (registers `rpc-worker`)
from mmchat.cli import run as _run  # noqa: F401  (registers `run`)
from mmchat.cli import serve as _serve  # noqa: F401  (registers `serve`)
from mmchat.cli import store as _store  # noqa: F401  (registers pull/list/show/rm/cp/create)
from mmchat.cli.app import app, state
from mmchat.errors import UserError


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, standalone_mode=True)
    except UserError as exc:
        if state.get("debug"):
            raise
        from mmchat.console import print_error

        print_error(str(exc))
        sys.exit(exc.exit_code)


__all__ = ["app", "main"]
