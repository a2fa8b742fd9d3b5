"""The privacy guard's check of a site's test-metrics table (:mod:`client.guard`): numbers of
the requested models under the keys :mod:`common.metrics` writes, curves and calibration
groups as the protocol bounds them, the site update's summary."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping

from common.errors import MyeloFedError
from common.metrics.survival import MAX_RISK_GROUPS, RISK_GROUPS
from common.metrics.tables import (
    CLASSIFICATION_KEYS,
    CONFUSION_CELLS,
    REGRESSION_KEYS,
    SURVIVAL_KEYS,
    THRESHOLD_METRICS,
    PairedTest,
    small_cells,
)
from common.payloads import NOMOGRAM_SITE_UPDATED, SITE_UPDATED
from common.protocol import StudyProtocol, TaskKind, ValidationSpec
from common.selection.updating import candidates


class PrivacyGuardError(MyeloFedError):
    """A reply does not follow what may leave the site."""


def number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_table(text: str, names: list[str], protocol: StudyProtocol) -> None:
    """A site's test metrics (:class:`common.payloads.ModelMetrics`): numbers of the requested
    models under the keys :mod:`common.metrics` writes, curves as the protocol bounds them."""
    def fail(reason: str) -> PrivacyGuardError:
        return PrivacyGuardError(f"the metrics table: {reason}")

    table = json.loads(text)
    updated = SITE_UPDATED in names or NOMOGRAM_SITE_UPDATED in names
    expected = {"models", "comparisons", *(["update"] if updated else [])}
    if not isinstance(table, dict) or set(table) != expected:
        raise fail(f"it must hold {' and '.join(repr(k) for k in sorted(expected))} only")
    if updated:
        _check_update(table["update"], fail)
    models, comparisons = table["models"], table["comparisons"]
    if not isinstance(models, dict) or set(models) != set(names):
        raise fail(f"its models {sorted(models)} are not the requested {sorted(names)}")
    classification = protocol.task.kind is TaskKind.CLASSIFICATION
    survival = protocol.task.kind is TaskKind.SURVIVAL
    keys = (CLASSIFICATION_KEYS if classification else SURVIVAL_KEYS if survival
            else REGRESSION_KEYS)
    v = protocol.validation
    for name, metrics in models.items():
        if not isinstance(metrics, dict) or set(metrics) != keys:
            extra = sorted(set(metrics) - keys) if isinstance(metrics, dict) else []
            raise fail(f"model '{name}' holds other metrics than its task's{': ' if extra else ''}"
                       f"{', '.join(extra)}")
        if survival:
            _check_survival(name, metrics, v, fail)
            continue
        for key, value in metrics.items():
            if key == "calibration_curve":
                _check_curve(name, key, value, v.n_bins, fail)
                small = [row[0] for row in value if row[0] < v.min_count]
                if small:
                    raise fail(f"model '{name}': a calibration bin of {small[0]} patients, "
                               f"fewer than min_count = {v.min_count}")
            elif key == "decision_curve":
                _check_curve(name, key, value, len(v.decision_thresholds), fail)
                if [row[0] for row in value] != [float(t) for t in v.decision_thresholds]:
                    raise fail(f"model '{name}': the decision curve is not at the protocol's "
                               "thresholds")
            elif not number(value):
                raise fail(f"model '{name}': '{key}' is not a number")
        if classification:
            _check_confusion(name, metrics, v.min_count, fail)
    allowed = {f"{names[0]} vs {other}" for other in names[1:]} if names else set()
    fields = {f.name for f in dataclasses.fields(PairedTest)}
    if not isinstance(comparisons, dict):
        raise fail("'comparisons' is not a mapping")
    for key, test in comparisons.items():
        if key not in allowed or not isinstance(test, dict) or set(test) != fields or not all(
                number(x) for x in test.values()):
            raise fail(f"comparison '{key}' is not a DeLong test of the requested models")


def _check_survival(model: str, row: Mapping[str, object], v: ValidationSpec,
                    fail: Callable[[str], PrivacyGuardError]) -> None:
    """A Cox model's row (:func:`common.metrics.survival.survival_table`): numbers, the
    per-time values at the protocol's times, the calibration in risk groups of at least
    min_count, the Kaplan-Meier curves on the protocol's grid with no value where fewer than
    min_count are at risk."""
    times, grid = [float(t) for t in v.times], [float(g) for g in v.km_grid]
    for key in ("auc_at", "brier_at"):
        rows = row[key]
        if not isinstance(rows, list) or [r[0] if isinstance(r, list) and len(r) == 2 else None
                                          for r in rows] != times or not all(
                number(r[1]) for r in rows):
            raise fail(f"model '{model}': '{key}' is not one number at each protocol time")
    calibration = row["calibration_at"]
    if not isinstance(calibration, list) or len(calibration) > len(times) * MAX_RISK_GROUPS:
        raise fail(f"model '{model}': 'calibration_at' is not a list of risk groups per time")
    for r in calibration:
        if (not isinstance(r, list) or len(r) != 5 or r[0] not in times
                or r[1] not in RISK_GROUPS or not all(number(x) for x in r[2:])):
            raise fail(f"model '{model}': a row of 'calibration_at' is not a time, a risk "
                       "group and three numbers")
        if r[2] < v.min_count:
            raise fail(f"model '{model}': a risk group of {r[2]:g} patients, fewer than "
                       f"min_count = {v.min_count}")
    if row["grid"] != grid:
        raise fail(f"model '{model}': the Kaplan-Meier grid is not the protocol's km_grid")
    curves = row["kaplan_meier"]
    if not isinstance(curves, dict) or not set(curves) <= set(RISK_GROUPS):
        raise fail(f"model '{model}': 'kaplan_meier' is not a curve per risk group")
    for group, curve in curves.items():
        if not isinstance(curve, dict) or set(curve) != {"survival", "at_risk"}:
            raise fail(f"model '{model}': the '{group}' curve is not survival and at_risk")
        survival, at_risk = curve["survival"], curve["at_risk"]
        if (not isinstance(survival, list) or not isinstance(at_risk, list)
                or len(survival) != len(grid) or len(at_risk) != len(grid)
                or not all(number(x) for x in survival)):
            raise fail(f"model '{model}': the '{group}' curve is not one value per grid time")
        for value, count in zip(survival, at_risk, strict=True):
            if count is None and value == value:
                raise fail(f"model '{model}': the '{group}' curve has a value where fewer "
                           "than min_count are at risk")
            if count is not None and (not number(count) or count < v.min_count):
                raise fail(f"model '{model}': the '{group}' curve counts {count} at risk, "
                           f"fewer than min_count = {v.min_count}")
    for key in SURVIVAL_KEYS - {"auc_at", "brier_at", "calibration_at", "kaplan_meier", "grid"}:
        if not number(row[key]):
            raise fail(f"model '{model}': '{key}' is not a number")


def _check_confusion(model: str, row: Mapping[str, object], min_count: int,
                     fail: Callable[[str], PrivacyGuardError]) -> None:
    """No confusion-matrix cell of 1 to min_count - 1 patients; a withheld matrix (a NaN cell)
    takes every metric built from it along (with the test counts, one would give the cells)."""
    small = small_cells(row, min_count)
    if small:
        raise fail(f"model '{model}': confusion-matrix cell '{small[0]}' counts "
                   f"{row[small[0]]:g}, fewer than min_count = {min_count} (and more than 0)")
    if any(row[c] != row[c] for c in CONFUSION_CELLS):
        shown = [k for k in THRESHOLD_METRICS if row[k] == row[k]]
        if shown:
            raise fail(f"model '{model}': '{shown[0]}' is sent with its confusion matrix "
                       "withheld")


def _check_update(update: object, fail: Callable[[str], PrivacyGuardError]) -> None:
    """The site update's summary: a candidate's name (no free text) and each candidate's
    cross-validated deviance, a number or None."""
    names = candidates()
    if not isinstance(update, dict) or set(update) != {"choice", "deviance"}:
        raise fail("'update' must hold 'choice' and 'deviance' only")
    if update["choice"] not in names:
        raise fail(f"'update': the choice is not one of the candidates {names}")
    deviance = update["deviance"]
    if not isinstance(deviance, dict) or not set(deviance) <= set(names) or not all(
            v is None or number(v) for v in deviance.values()):
        raise fail("'update': 'deviance' is not a number or None per candidate")


def _check_curve(model: str, key: str, rows: object, most: int,
                 fail: Callable[[str], PrivacyGuardError]) -> None:
    if not isinstance(rows, list) or len(rows) > most:
        raise fail(f"model '{model}': '{key}' is not a list of at most {most} rows")
    for row in rows:
        if not isinstance(row, list) or len(row) != 3 or not all(number(x) for x in row):
            raise fail(f"model '{model}': a row of '{key}' is not three numbers")
