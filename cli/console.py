"""What every ``myelofed`` command shares: its two consoles, the way it fails on a bad input,
and how its help is rendered.

Help is click's plain text (``rich_markup_mode=None``: the ``\\b`` blocks of the help texts keep
their lines, nothing is drawn in boxes). typer 0.20, which Flower 1.42 pins (``typer<0.21``),
escapes the ``[required]``, ``[default: ...]`` and ``[x>=1]`` notes for Rich even then, so plain
help showed ``\\[required]`` (fixed in later typer releases, fastapi/typer#1089): our
:class:`Typer` renders option and argument rows with a formatter that prints them as written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from typer.core import TyperCommand, TyperGroup

from cli.exit_codes import ExitCode
from common.errors import ConfigError

CommandFunction = TypeVar("CommandFunction", bound=Callable[..., Any])

#: Progress, warnings and errors (stderr).
console = Console(stderr=True)
#: Results: paths, tables, hashes (stdout).
out = Console()


def fail_config(exc: ConfigError) -> NoReturn:
    """Print ``exc`` (the file or option, each field and the reason) and exit 2."""
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(ExitCode.CONFIG)


def need(*paths: Path) -> None:
    """Exit 2 naming the first of ``paths`` that is not a file."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        fail_config(ConfigError(str(missing[0]), ["not found"]))


def progress_columns(*extra: ProgressColumn) -> tuple[ProgressColumn, ...]:
    """A progress bar's columns: description, bar, done/total, ``extra``, time left."""
    return (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
            TimeRemainingColumn())


class _PlainHelpFormatter(click.HelpFormatter):
    """click's formatter, with typer's Rich escape taken off option and argument rows."""

    def write_dl(self, rows: Iterable[tuple[str, str]], col_max: int = 30,
                 col_spacing: int = 2) -> None:
        super().write_dl([(term, text.replace("\\[", "[")) for term, text in rows], col_max,
                         col_spacing)


class _PlainHelpContext(click.Context):
    formatter_class = _PlainHelpFormatter


class _Command(TyperCommand):
    context_class = _PlainHelpContext


class _Group(TyperGroup):
    context_class = _PlainHelpContext


class Typer(typer.Typer):
    """A ``myelofed`` command group: plain help (see the module's docstring), ``-h`` as well as
    ``--help``, and its help when called without a command."""

    def __init__(self, help: str) -> None:  # noqa: A002 - typer's own name for it
        super().__init__(help=help, cls=_Group, no_args_is_help=True, add_completion=False,
                         rich_markup_mode=None,
                         context_settings={"help_option_names": ["-h", "--help"]})

    def command(  # type: ignore[override]
            self, name: str) -> Callable[[CommandFunction], CommandFunction]:
        """Register a command called ``name`` with plain help."""
        return super().command(name, cls=_Command)
