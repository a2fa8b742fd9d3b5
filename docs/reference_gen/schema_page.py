"""``reference/protocol.md`` and ``reference/config.md``, from the pydantic models' JSON schema:

* ``render_model``: every model reachable from one, a section each with a table of its fields
  (name, type, default, description);
* ``render_protocol``: ``StudyProtocol``, and the presets (``common.presets.list_presets``);
* ``render_config``: the site config (``SiteConfig``) and the run config
  (``[tool.flwr.app.config]`` of ``pyproject.toml``, described by the comments of
  ``deploy/templates/study-run.toml``).
"""

from __future__ import annotations

import json
import re
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import ROOT
from .markdown import cell, code_span, doc_cell, rst_to_markdown


def _schema_type(node: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        target = defs[name]
        if "enum" in target:
            return " or ".join(code_span(v) for v in target["enum"])
        return f"[{name}](#{name.lower()})"
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        text = " or ".join(_schema_type(o, defs) for o in options)
        if len(options) < len(node["anyOf"]):
            text += " (optional)"
        return text
    if "const" in node:
        return code_span(json.dumps(node["const"]))
    if "enum" in node:
        return " or ".join(code_span(v) for v in node["enum"])
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
        bounds.append(f"matching {code_span(node['pattern'])}")
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
    return code_span(json.dumps(value, separators=(", ", ": ")))


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
            out += [rst_to_markdown(node["description"]), ""]
        out += ["| field | type | default | description |", "|---|---|---|---|"]
        required = set(node.get("required", ()))
        for prop, sub in node.get("properties", {}).items():
            default = _schema_default(prop, sub, prop in required, classes.get(name))
            out.append(f"| `{prop}` | {_schema_type(sub, defs)} | {default} | "
                       f"{doc_cell(sub.get('description', ''))} |")
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
    out += [f"| `{name}` | {cell(_leading_comment(preset_path(name)) or text)} |"
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
        out.append(f"| `{key}` | {code_span(json.dumps(value))} | {cell(comments.get(key, ''))} |")
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
