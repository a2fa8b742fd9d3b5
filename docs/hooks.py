"""MkDocs hook: the reference pages are generated from the code at build time.

A page listed in ``GENERATED`` holds the marker ``<!-- generated -->``; at build time the
marker is replaced by markdown rendered from the code itself, so the reference cannot drift
from it:

* ``reference/cli.md``: the ``myelofed`` command tree (typer -> click), every command's help,
  usage and parameters, and the exit codes (``ExitCode`` and the docstring under each member);
* ``reference/protocol.md``: ``StudyProtocol.model_json_schema()``, one table per section
  (name, type, default, description), and the presets (``common.presets.list_presets``);
* ``reference/config.md``: the site config (``SiteConfig``'s JSON schema) and the run config
  (``[tool.flwr.app.config]`` of ``pyproject.toml``, described by the comments of
  ``deploy/templates/study-run.toml``).

Only the standard library, MkDocs and the project are used; no plugin is needed.
"""

from __future__ import annotations

import ast
import html
import inspect
import itertools
import json
import os
import re
import sys
import textwrap
import tomllib
import typing
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- generated -->"


def on_config(config: Any) -> Any:
    """Make the project importable from its source tree, whatever the working directory."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the marker of a generated page by what the code says."""
    render = GENERATED.get(page.file.src_uri)
    if render is None:
        return markdown
    if markdown.count(MARKER) != 1:
        raise PluginError(f"{page.file.src_uri} must hold the marker {MARKER} exactly once")
    return markdown.replace(MARKER, render())


# --- text helpers ------------------------------------------------------------------------------

def _text(value: str) -> str:
    """Plain help text -> safe inline markdown: no rich/click escapes, no raw HTML, no pipes."""
    value = value.replace("\\[", "[").replace("\x08", "")
    value = html.escape(value, quote=False)
    return value.replace("|", "&#124;").replace("*", "\\*")


def _cell(value: str) -> str:
    """One table cell: plain text on one line."""
    return " ".join(_text(value).split())


def _doc_cell(value: str) -> str:
    """One table cell from a docstring: reST literals become code spans."""
    return " ".join(_inline(value.replace("``", "`")).split())


def _code(value: object) -> str:
    """A value as a code span (backticks inside are not expected; fall back to plain text)."""
    text = str(value)
    if "`" in text or "|" in text:
        return _cell(text)
    return f"`{text}`"


def _rst_to_markdown(doc: str) -> str:
    """A numpy/reST docstring (as pydantic keeps it) -> markdown paragraphs and lists."""
    doc = re.sub(r":(?:class|meth|func|attr|mod):`~?([^`]+)`", r"``\1``", doc)
    doc = doc.replace("``", "`")
    blocks = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = paragraph.splitlines()
        if lines and re.match(r"^[*-] ", lines[0]):
            items: list[str] = []
            for line in lines:
                if re.match(r"^[*-] ", line):
                    items.append(line[2:].strip())
                else:
                    items[-1] += " " + line.strip()
            blocks.append("\n".join(f"- {_inline(item)}" for item in items))
        else:
            blocks.append(_inline(" ".join(line.strip() for line in lines)))
    return "\n\n".join(blocks)


def _inline(value: str) -> str:
    """Escape HTML outside code spans; keep `code` as it is."""
    parts = re.split(r"(`[^`]*`)", value)
    return "".join(p if p.startswith("`") else _text(p) for p in parts)


def _help_blocks(help_text: str) -> str:
    """Click help -> markdown. A paragraph opened by click's no-rewrap marker (\\b) keeps its
    lines: its indented lines become a code block, the others prose."""
    out = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(help_text).strip()):
        lines = paragraph.splitlines()
        if lines and lines[0].strip() == "\x08":
            out += _no_rewrap(lines[1:])
        else:
            out.append(_text(" ".join(line.strip() for line in lines)))
    return "\n\n".join(block for block in out if block.strip())


def _no_rewrap(lines: list[str]) -> list[str]:
    """The lines of a no-rewrap paragraph -> markdown blocks: each run of indented lines a code
    block, each run of other lines one prose paragraph; a lone marker line ends a run."""
    blocks: list[str] = []
    run: list[str] = []
    run_is_code = False

    def is_code(line: str) -> bool:
        return line[:1].isspace()

    for line in [*lines, "\x08"]:
        marker = line.strip() == "\x08"
        if run and (marker or is_code(line) != run_is_code):
            if run_is_code:
                text = textwrap.dedent("\n".join(run)).strip("\n")
                blocks.append(f"```text\n{text}\n```")
            else:
                blocks.append(_text(" ".join(x.strip() for x in run)))
            run = []
        if not marker:
            if not run:
                run_is_code = is_code(line)
            run.append(line)
    return blocks


def _shown_path(path: Path) -> str:
    """An absolute default path inside the checkout's folder, shown relative to the repository."""
    try:
        if path.is_absolute() and path.resolve().is_relative_to(ROOT.parent):
            return os.path.relpath(path.resolve(), ROOT)
    except (OSError, ValueError):
        pass
    return str(path)


# --- the command line --------------------------------------------------------------------------

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
        text = " or ".join(_code(c) for c in kind.choices)
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
            return _code(param.opts[0] if default else param.secondary_opts[0])
        return "off" if not default else "on"
    if isinstance(default, Path):
        return _code(_shown_path(default))
    if isinstance(default, (list, tuple)):
        return ", ".join(_code(v) for v in default) if default else ""
    return _code(default)


def _param_name(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return _code((param.metavar or param.name or "").upper())
    opts = sorted(param.opts, key=lambda o: (not o.startswith("--"), o))
    names = ", ".join(_code(o) for o in opts)
    if param.secondary_opts:
        names += " / " + ", ".join(_code(o) for o in param.secondary_opts)
    return names


def _commands(group: click.Group, ctx: click.Context) -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        if not command.hidden:
            yield name, command


def _render_command(command: click.Command, ctx: click.Context, level: int) -> list[str]:
    out = [f"{'#' * level} `{ctx.command_path}`", ""]
    if command.help:
        out += [_help_blocks(command.help), ""]
    if isinstance(command, click.Group):
        rows = [(name, sub) for name, sub in _commands(command, ctx)]
        out += ["| command | what it does |", "|---|---|"]
        for name, sub in rows:
            summary = sub.get_short_help_str(limit=200)
            anchor = _slug(f"{ctx.command_path} {name}")
            out.append(f"| [`{ctx.command_path} {name}`](#{anchor}) | {_cell(summary)} |")
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
                       f"{_cell(text)} |")
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
        meaning = _doc_cell(docs.get(member.name, ""))
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
        out += [_help_blocks(root.help), ""]
    out += ["## Exit codes", "", "The same for every command:", ""] + _exit_codes() + [""]
    if isinstance(root, click.Group):
        out += ["## Commands", "", "| command | what it does |", "|---|---|"]
        commands = list(_commands(root, ctx))
        for name, command in commands:
            anchor = _slug(f"myelofed {name}")
            summary = command.get_short_help_str(limit=200)
            out.append(f"| [`myelofed {name}`](#{anchor}) | {_cell(summary)} |")
        out.append("")
        for name, command in commands:
            sub_ctx = click.Context(command, info_name=name, parent=ctx)
            out += _render_command(command, sub_ctx, 2)
    text = "\n".join(out)
    if "\\[" in text.replace("```", ""):
        raise PluginError("reference/cli.md: a rich escape '\\[' is left in the help text")
    return text


# --- pydantic models ---------------------------------------------------------------------------

def _schema_type(node: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        target = defs[name]
        if "enum" in target:
            return " or ".join(_code(v) for v in target["enum"])
        return f"[{name}](#{name.lower()})"
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        text = " or ".join(_schema_type(o, defs) for o in options)
        if len(options) < len(node["anyOf"]):
            text += " (optional)"
        return text
    if "const" in node:
        return _code(json.dumps(node["const"]))
    if "enum" in node:
        return " or ".join(_code(v) for v in node["enum"])
    kind = node.get("type")
    if kind == "array":
        if "prefixItems" in node:
            text = "[" + ", ".join(_schema_type(i, defs) for i in node["prefixItems"]) + "]"
        else:
            text = "list of " + (_schema_type(node["items"], defs) if "items" in node else "any")
            if "minItems" in node or "maxItems" in node:
                text += f" ({node.get('minItems', 0)} to {node.get('maxItems', 'any')})"
        return text
    if kind == "object":
        value = node.get("additionalProperties")
        if isinstance(value, dict):
            return "table: name -> " + _schema_type(value, defs)
        return "table"
    names = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}
    text = names.get(str(kind), str(kind))
    bounds = []
    for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
                      ("exclusiveMaximum", "<")):
        if key in node:
            bounds.append(f"{sign} {node[key]}")
    if node.get("minLength") == 1:
        bounds.append("not empty")
    elif "minLength" in node:
        bounds.append(f"at least {node['minLength']} characters")
    if "pattern" in node:
        bounds.append(f"matching {_code(node['pattern'])}")
    if not bounds:
        return text
    if kind == "string":
        return f"{text} ({', '.join(bounds)})"
    return f"{text} {', '.join(bounds)}"


def _schema_default(name: str, node: dict[str, Any], required: bool, model: Any) -> str:
    if required:
        return "required"
    if "default" not in node:
        field = model.model_fields.get(name) if model is not None else None
        if field is None:
            return ""
        value = field.get_default(call_default_factory=True)
        value = json.loads(json.dumps(value, default=str))
    else:
        value = node["default"]
    if value is None:
        return "absent"
    if isinstance(value, dict) and ("$ref" in node or "$ref" in json.dumps(node)):
        return "its defaults"
    if isinstance(value, dict) and not value:
        return "empty"
    return _code(json.dumps(value, separators=(", ", ": ")))


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"].rsplit("/", 1)[-1]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def render_model(model: Any, root_title: str, level: int = 2) -> str:
    """Every model reachable from ``model``: one section each, with a table of its fields."""
    schema = model.model_json_schema()
    defs: dict[str, Any] = schema.get("$defs", {})
    classes = _model_classes(model)
    order: list[tuple[str, str, dict[str, Any]]] = [(model.__name__, "", schema)]
    seen = {model.__name__}
    i = 0
    while i < len(order):
        _, path, node = order[i]
        for prop, sub in node.get("properties", {}).items():
            for ref in _refs(sub):
                if ref not in seen and "properties" in defs.get(ref, {}):
                    seen.add(ref)
                    order.append((ref, f"{path}.{prop}" if path else prop, defs[ref]))
        i += 1
    out = []
    for name, path, node in order:
        where = f"`[{path}]`" if path else root_title
        out += [f"{'#' * level} {where}: {name} {{#{name.lower()}}}", ""]
        if node.get("description"):
            out += [_rst_to_markdown(node["description"]), ""]
        out += ["| field | type | default | description |", "|---|---|---|---|"]
        required = set(node.get("required", ()))
        for prop, sub in node.get("properties", {}).items():
            default = _schema_default(prop, sub, prop in required, classes.get(name))
            out.append(f"| `{prop}` | {_schema_type(sub, defs)} | {default} | "
                       f"{_doc_cell(sub.get('description', ''))} |")
        out.append("")
    return "\n".join(out)


def _model_classes(model: Any) -> dict[str, Any]:
    """Model name -> pydantic class, for the defaults a JSON schema leaves out (factories)."""
    from pydantic import BaseModel

    found: dict[str, Any] = {}

    def visit(cls: Any) -> None:
        if cls.__name__ in found:
            return
        found[cls.__name__] = cls
        for field in cls.model_fields.values():
            for arg in _type_args(field.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    visit(arg)

    visit(model)
    return found


def _type_args(annotation: Any) -> Iterator[Any]:
    yield annotation
    for arg in typing.get_args(annotation):
        yield from _type_args(arg)


def render_protocol() -> str:
    from common.presets import list_presets, preset_path
    from common.protocol import StudyProtocol

    out = [render_model(StudyProtocol, "Top level"), "## Presets", "",
           "Use one as `preset:NAME` wherever a protocol file is asked for.", "",
           "| preset | what it is |", "|---|---|"]
    presets = list_presets()
    out += [f"| `{name}` | {_cell(_leading_comment(preset_path(name)) or text)} |"
            for name, text in presets.items()]
    example = "spine_mri_t1w"
    if example in presets:
        text = preset_path(example).read_text(encoding="utf-8").rstrip()
        out += ["", f"### An example: `preset:{example}`", "",
                f"```toml\n{text}\n```"]
    return "\n".join(out) + "\n"


def render_config() -> str:
    from common.site_config import SiteConfig

    site_intro = ("Read by `myelofed site check`, `site extract` and `site join`, and by the "
                  "site's ClientApp (`--node-config 'site-config=\"/path/site.toml\"'`). "
                  "Relative paths are taken from the config file's folder. It never leaves the "
                  "site and is not hashed.")
    run_intro = ("The keys `flwr run` accepts in `--run-config` (declared in `pyproject.toml` "
                 "under `[tool.flwr.app.config]`; descriptions from "
                 "`deploy/templates/study-run.toml`).")
    out = ["## The site config", "", site_intro, "",
           render_model(SiteConfig, "Top level", level=3), "## The run config", "", run_intro, "",
           "| key | default | description |", "|---|---|---|"]
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    keys = config["tool"]["flwr"]["app"]["config"]
    comments = {**RUN_CONFIG_NOTES,
                **_template_comments(ROOT / "deploy" / "templates" / "study-run.toml")}
    for key, value in keys.items():
        out.append(f"| `{key}` | {_code(json.dumps(value))} | {_cell(comments.get(key, ''))} |")
    return "\n".join(out) + "\n"


def _leading_comment(path: Path) -> str:
    """The comment block a preset file opens with, as one paragraph."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    return " ".join(lines)


def _template_comments(path: Path) -> dict[str, str]:
    """``key = value  # comment`` lines of a TOML template -> key: comment."""
    if not path.is_file():
        return {}
    comments = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r'^([A-Za-z0-9_-]+)\s*=\s*(?:"[^"]*"|[^#]*?)\s*#\s*(.+)$', line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


#: Descriptions of run-config keys that the template leaves without a comment (the template's
#: comment wins where there is one). Keys and defaults always come from pyproject.toml.
RUN_CONFIG_NOTES = {
    "min-cases-per-site": "a site with fewer usable cases is excluded at the handshake, by name",
    "simulation-cohort": "the simulation engine only: a cohort made by `myelofed simulate`; "
                         "each virtual SuperNode takes the site of its partition id",
    "test-fraction": "each site's stratified, seeded test share (the split never changes)",
    "combat-min-batch-size": "ComBat refuses a batch (scanner) with fewer patients",
}

GENERATED: dict[str, Callable[[], str]] = {
    "reference/cli.md": render_cli,
    "reference/protocol.md": render_protocol,
    "reference/config.md": render_config,
}
