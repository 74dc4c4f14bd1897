"""The terminal lrc writes to: ``out`` (results), ``err`` (errors and progress) and the one line every bad input ends
in. Shared by the CLI's commands (``cli.py``, ``finetune/command.py``) so neither imports the other."""
from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from .errors import LrcError

out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def error_line(e: LrcError) -> None:
    """The one line every bad input ends in: ``soft_wrap`` keeps a long message unbroken at a log's width, and the
    message is escaped so a ``[name]`` in a path or list is printed, not read as rich markup."""
    err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)


def fail(e: LrcError) -> None:
    """``error_line`` and the exit code of ``e``."""
    error_line(e)
    raise typer.Exit(e.exit_code)
