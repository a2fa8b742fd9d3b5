"""The renderers of the generated reference pages, used by the MkDocs hook (``docs/hooks.py``).

* ``markdown``: help text and docstrings -> safe markdown (escapes, table cells, code spans);
* ``cli_page``: ``reference/cli.md``, from the typer app and ``ExitCode``;
* ``schema_page``: ``reference/protocol.md`` and ``reference/config.md``, from the pydantic
  models' JSON schema, the presets, ``pyproject.toml`` and the run-config template.

Build code, not part of the site (``exclude_docs`` in ``mkdocs.yml``). The hook imports this
package from its own folder, so its name is a top-level one; the project's packages (``cli``,
``common``) are imported inside the renderers, once the hook has put the repository on
``sys.path``.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
