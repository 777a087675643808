"""Errors that are the user's to fix: the CLI prints them as one red line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can act on (bad input, missing file, bad name...).

    The message is complete and fit to print as it is; no traceback is shown
    unless ``--debug`` is given.
    """

    exit_code = 2


class NotFoundError(UserError):
    """A named thing (model, file, repository) does not exist."""


class CorruptFileError(UserError):
    """A file exists but is not what it claims to be (truncated, wrong format)."""
