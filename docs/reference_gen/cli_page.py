"""``reference/cli.md``: the ``myelofed`` command tree (typer -> click), every command's help,
usage and parameters, and the exit codes (``ExitCode`` and the docstring under each member)."""

from __future__ import annotations

import ast
import inspect
import itertools
import os
import re
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from mkdocs.exceptions import PluginError

from . import ROOT
from .markdown import cell, code_span, doc_cell, help_blocks


def _shown_path(path: Path) -> str:
    """An absolute default path inside the checkout's folder, shown relative to the repository."""
    try:
        if path.is_absolute() and path.resolve().is_relative_to(ROOT.parent):
            return os.path.relpath(path.resolve(), ROOT)
    except (OSError, ValueError):
        pass
    return str(path)


def _cli_app() -> Any:
    """The ``myelofed`` typer app: ``cli.main.app``."""
    from cli.main import app

    return app


def _argument_help(command: click.Command) -> dict[str, str]:
    """Help of typer Arguments, read from the function's annotations (typer's plain, non-rich
    help does not keep it on the click parameter)."""
    if command.callback is None:
        return {}
    try:
        hints = typing.get_type_hints(inspect.unwrap(command.callback), include_extras=True)
    except Exception:  # noqa: BLE001 - annotations that cannot be resolved: no extra help
        return {}
    helps = {}
    for name, hint in hints.items():
        for meta in getattr(hint, "__metadata__", ()):
            text = getattr(meta, "help", None)
            if isinstance(text, str):
                helps[name] = text
    return helps


def _param_type(param: click.Parameter) -> str:
    kind = param.type
    if isinstance(param, click.Option) and param.is_flag:
        text = "flag"
    elif isinstance(kind, click.Choice):
        text = " or ".join(code_span(c) for c in kind.choices)
    elif isinstance(kind, (click.IntRange, click.FloatRange)):
        base = "integer" if isinstance(kind, click.IntRange) else "number"
        bounds = []
        if kind.min is not None:
            bounds.append(f"{'>' if kind.min_open else '>='} {kind.min}")
        if kind.max is not None:
            bounds.append(f"{'<' if kind.max_open else '<='} {kind.max}")
        text = f"{base} {', '.join(bounds)}".strip()
    elif isinstance(kind, click.Path):
        text = "path"
    else:
        text = {"text": "text", "integer": "integer", "float": "number",
                "boolean": "boolean", "uuid": "UUID", "filename": "file"}.get(kind.name, kind.name)
    if param.multiple:
        text += ", repeatable"
    if param.nargs == -1:
        text += ", one or more"
    return text


def _param_default(param: click.Parameter) -> str:
    if param.required:
        return "required"
    default = param.default
    if default is None or callable(default):
        return ""
    if isinstance(param, click.Option) and param.is_flag:
        if param.secondary_opts:
            return code_span(param.opts[0] if default else param.secondary_opts[0])
        return "off" if not default else "on"
    if isinstance(default, Path):
        return code_span(_shown_path(default))
    if isinstance(default, (list, tuple)):
        return ", ".join(code_span(v) for v in default) if default else ""
    return code_span(default)


def _param_name(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return code_span((param.metavar or param.name or "").upper())
    opts = sorted(param.opts, key=lambda o: (not o.startswith("--"), o))
    names = ", ".join(code_span(o) for o in opts)
    if param.secondary_opts:
        names += " / " + ", ".join(code_span(o) for o in param.secondary_opts)
    return names


def _commands(group: click.Group, ctx: click.Context) -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        if not command.hidden:
            yield name, command


def _render_command(command: click.Command, ctx: click.Context, level: int) -> list[str]:
    out = [f"{'#' * level} `{ctx.command_path}`", ""]
    if command.help:
        out += [help_blocks(command.help), ""]
    if isinstance(command, click.Group):
        rows = [(name, sub) for name, sub in _commands(command, ctx)]
        out += ["| command | what it does |", "|---|---|"]
        for name, sub in rows:
            summary = sub.get_short_help_str(limit=200)
            anchor = _slug(f"{ctx.command_path} {name}")
            out.append(f"| [`{ctx.command_path} {name}`](#{anchor}) | {cell(summary)} |")
        out.append("")
        for name, sub in rows:
            sub_ctx = click.Context(sub, info_name=name, parent=ctx)
            out += _render_command(sub, sub_ctx, min(level + 1, 6))
        return out
    usage = " ".join(command.collect_usage_pieces(ctx))
    out += ["Usage:", "", f"```text\n{ctx.command_path} {usage}\n```", ""]
    params = [p for p in command.params
              if not getattr(p, "hidden", False) and p.name not in ("help",)
              and not (isinstance(p, click.Option) and "--help" in p.opts)]
    if params:
        extra = _argument_help(command)
        out += ["| parameter | type | default | description |", "|---|---|---|---|"]
        for p in params:
            text = getattr(p, "help", None) or extra.get(p.name or "", "")
            out.append(f"| {_param_name(p)} | {_param_type(p)} | {_param_default(p)} | "
                       f"{cell(text)} |")
        out.append("")
    return out


def _slug(text: str) -> str:
    """The anchor MkDocs' toc extension gives a heading holding this text in a code span."""
    return re.sub(r"[^\w\- ]", "", text.lower()).strip().replace(" ", "-")


def _exit_codes() -> list[str]:
    """``ExitCode``'s members with the docstring written under each one."""
    from cli.exit_codes import ExitCode

    source = Path(inspect.getsourcefile(ExitCode) or "")
    tree = ast.parse(source.read_text(encoding="utf-8"))
    docs: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == ExitCode.__name__:
            body = node.body
            for stmt, after in itertools.pairwise(body):
                if (isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name)
                        and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)):
                    docs[stmt.targets[0].id] = str(after.value.value)
    rows = ["| code | name | meaning |", "|---|---|---|"]
    for member in ExitCode:
        meaning = doc_cell(docs.get(member.name, ""))
        rows.append(f"| `{int(member)}` | `{member.name}` | {meaning} |")
    return rows


def render_cli() -> str:
    # typer 0.20 imports helpers click 8.3 deprecates: not ours to fix, and not the reader's.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import typer.main

        app = _cli_app()
    root = typer.main.get_command(app)
    ctx = click.Context(root, info_name="myelofed")
    out: list[str] = []
    if root.help:
        out += [help_blocks(root.help), ""]
    out += ["## Exit codes", "", "The same for every command:", ""] + _exit_codes() + [""]
    if isinstance(root, click.Group):
        out += ["## Commands", "", "| command | what it does |", "|---|---|"]
        commands = list(_commands(root, ctx))
        for name, command in commands:
            anchor = _slug(f"myelofed {name}")
            summary = command.get_short_help_str(limit=200)
            out.append(f"| [`myelofed {name}`](#{anchor}) | {cell(summary)} |")
        out.append("")
        for name, command in commands:
            sub_ctx = click.Context(command, info_name=name, parent=ctx)
            out += _render_command(command, sub_ctx, 2)
    text = "\n".join(out)
    if "\\[" in text.replace("```", ""):
        raise PluginError("reference/cli.md: a rich escape '\\[' is left in the help text")
    return text
