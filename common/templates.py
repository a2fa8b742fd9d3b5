"""HTML rendering of the reports: Jinja2 templates shipped with the package, autoescaped."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _environment():  # noqa: ANN202 - a jinja2.Environment
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    return Environment(loader=PackageLoader("common", "report_templates"),
                       autoescape=select_autoescape(["html", "j2"]), undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def render(template: str, **context: Any) -> str:
    """The named template (``common/report_templates/``) filled with ``context``."""
    return _environment().get_template(template).render(**context)
