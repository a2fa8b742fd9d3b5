"""``myelofed protocol``: the study protocol the coordinator writes and every site runs."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from cli.console import Typer, fail_config, out
from common.errors import ConfigError
from common.presets import list_presets

app = Typer(help="Inspect and validate study protocols.")

SourceArg = Annotated[str, typer.Argument(help="A protocol file or preset:NAME.")]


@app.command("presets")
def protocol_presets() -> None:
    """List the protocols shipped with MyeloFed (use them as 'preset:NAME')."""
    table = Table("preset", "description")
    for name, text in list_presets().items():
        table.add_row(f"preset:{name}", text)
    out.print(table)


@app.command("show")
def protocol_show(source: SourceArg) -> None:
    """Print a protocol (all defaults filled in, as JSON) and its content hash."""
    from common.protocol import load_protocol  # deferred: heavy (see cli/__init__.py)

    try:
        protocol = load_protocol(source)
    except ConfigError as exc:
        fail_config(exc)
    out.print_json(json.dumps(protocol.model_dump(mode="json")))
    out.print(f"content hash: {protocol.content_hash()}", soft_wrap=True)


@app.command("validate")
def protocol_validate(source: SourceArg) -> None:
    """Validate a protocol: exit 0 and print its hash, or exit 2 naming each bad field."""
    from common.protocol import load_protocol  # deferred: heavy (see cli/__init__.py)

    try:
        protocol = load_protocol(source)
    except ConfigError as exc:
        fail_config(exc)
    out.print(f"{source}: valid protocol '{protocol.name}', hash {protocol.content_hash()}",
              soft_wrap=True)
