"""What a site's metrics table may hold: the keys of one model's row (classification,
regression, survival) and the fields of a paired comparison. The site's privacy guard refuses
any other key; it imports this module in every site process, so it stays light (no SciPy). And
what of a row may leave a site (:func:`releasable`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from common.metrics.threshold import AtThreshold


@dataclass(frozen=True)
class PairedTest:
    """DeLong's test of two correlated AUCs (same patients): difference a - b, z and p."""

    auc_a: float
    auc_b: float
    difference: float
    z: float
    p_value: float


#: What a site's table of one logistic model may hold (:func:`classification_table`): the
#: site's privacy guard refuses any other key.
CLASSIFICATION_KEYS = frozenset({
    "n", "n_positive", "auc", "auc_variance", "auc_low", "auc_high", "auc_boot_low",
    "auc_boot_high", *(f.name for f in fields(AtThreshold)), "brier", "calibration_intercept",
    "calibration_slope", "calibration_curve", "decision_curve"})

#: What a site's table of one regression model may hold (:func:`regression_table`): the
#: site's privacy guard refuses any other key.
REGRESSION_KEYS = frozenset({
    "n", "mae", "rmse", *(f"{name}{suffix}" for name in ("r", "spearman")
                          for suffix in ("", "_low", "_high", "_p")),
    "bias", "loa_low", "loa_high"})

#: What a site's table of one Cox model may hold (:func:`common.metrics.survival.
#: survival_table`): the site's privacy guard refuses any other key.
SURVIVAL_KEYS = frozenset({
    "n", "n_events", "tau", *(f"{name}{suffix}" for name in ("c_harrell", "c_uno")
                              for suffix in ("", "_low", "_high", "_se")),
    "auc_at", "mean_auc", "brier_at", "integrated_brier", "calibration_at", "kaplan_meier",
    "grid"})

#: Per loss, the headline metric of a model at a site (its key in the table, its name): what
#: the reports set side by side, pool across sites and put in the cross-site matrix.
HEADLINE = {"logistic": ("auc", "AUC"), "gaussian": ("r", "Pearson r"),
            "cox": ("c_harrell", "Harrell's C")}

#: The confusion matrix of a model at its threshold, and every metric built from its cells.
CONFUSION_CELLS = ("tp", "fp", "tn", "fn")
THRESHOLD_METRICS = tuple(f.name for f in fields(AtThreshold) if f.name != "threshold")


def small_cells(row: Mapping[str, object], min_count: int) -> list[str]:
    """The confusion-matrix cells of a metrics row that count 1 to ``min_count`` - 1 patients."""
    return [cell for cell in CONFUSION_CELLS
            if isinstance(value := row.get(cell), int | float) and 0 < value < min_count]


def releasable(row: Mapping[str, object], min_count: int) -> dict[str, object]:
    """A metrics row as it may leave a site: when a confusion-matrix cell counts 1 to
    ``min_count`` - 1 patients, the whole matrix and every metric built from it are withheld
    (NaN). One cell is not enough to withhold: with the test set's size and positives sent, any
    cell gives the other three (and sensitivity, specificity, PPV and NPV give the cells)."""
    if not small_cells(row, min_count):
        return dict(row)
    return {k: (float("nan") if k in THRESHOLD_METRICS else v) for k, v in row.items()}
