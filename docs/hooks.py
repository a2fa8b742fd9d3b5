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

Only the standard library, MkDocs and the project are used; no plugin is needed. The renderers
live beside this file, in ``docs/reference_gen/`` (markdown helpers, the CLI page, the schema
pages); this file is the hook's entry: the project on ``sys.path``, the marker, and the table of
generated pages.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

# MkDocs loads a hook by its file path, not as part of a package, with the hook's folder on
# sys.path only while the module body runs. The renderers beside it are imported from that folder
# here, whoever loads this file, and afresh each time it is loaded (`mkdocs serve` reloads the
# hook on a rebuild); sys.path is left as it was found.
_saved_path = sys.path.copy()
sys.path.insert(0, str(Path(__file__).resolve().parent))
for _name in [n for n in sys.modules if n.partition(".")[0] == "reference_gen"]:
    del sys.modules[_name]
try:
    from reference_gen import ROOT
    from reference_gen.cli_page import render_cli
    from reference_gen.schema_page import render_config, render_protocol
finally:
    sys.path[:] = _saved_path

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


GENERATED: dict[str, Callable[[], str]] = {
    "reference/cli.md": render_cli,
    "reference/protocol.md": render_protocol,
    "reference/config.md": render_config,
}
