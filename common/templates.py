"""HTML rendering of the reports: Jinja2 templates (:mod:`common.report_templates`), autoescaped."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from jinja2 import DictLoader, Environment, StrictUndefined, select_autoescape

from common.report_templates import TEMPLATES

if TYPE_CHECKING:
    from jinja2 import Environment


@lru_cache(maxsize=1)
def _environment() -> Environment:
    return Environment(loader=DictLoader(TEMPLATES),
                       autoescape=select_autoescape(["html", "j2"]), undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def render(template: str, **context: Any) -> str:
    """The named template (:data:`common.report_templates.TEMPLATES`) filled with
    ``context``."""
    return _environment().get_template(template).render(**context)


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: a float to ``digits`` decimals, an int as it is, "n/a" for None, NaN or
    infinity."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            return "n/a"
        return str(value) if isinstance(value, int) else f"{value:.{digits}f}"
    return "n/a" if value is None else str(value)


def at_times(rows: list[list[float]] | None) -> str:
    """'12: 0.712, 24: 0.684' from a survival metric's [time, value] rows."""
    return ", ".join(f"{t:g}: {fmt(v)}" for t, v in rows or [])


def with_ci(row: dict[str, Any] | None, metric: str) -> str:
    """'0.812 [0.701, 0.923]' from a metrics row (``metric``, ``metric_low``,
    ``metric_high``); the value alone without its bounds; "n/a" without the value."""
    if not row or row.get(metric) is None:
        return "n/a"
    low, high = row.get(f"{metric}_low"), row.get(f"{metric}_high")
    if low is None or high is None:
        return fmt(row[metric])
    return f"{fmt(row[metric])} [{fmt(low)}, {fmt(high)}]"


def confusion(row: dict[str, Any]) -> str:
    """A model's confusion matrix as a table cell ('TP 9 FP 2 TN 11 FN 3'); "withheld" when a
    site did not send it (a cell under the minimum count)."""
    cells = [row.get(c) for c in ("tp", "fp", "tn", "fn")]
    if any(c is None or (isinstance(c, float) and not math.isfinite(c)) for c in cells):
        return "withheld (a cell under the minimum count)"
    return "TP {} FP {} TN {} FN {}".format(*(fmt(c, 0) for c in cells))
