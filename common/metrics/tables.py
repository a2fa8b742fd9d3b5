"""What a site's metrics table may hold: the keys of one model's row (classification,
regression) and the fields of a paired comparison. The site's privacy guard refuses any other
key; it imports this module in every site process, so it stays light (no SciPy)."""

from __future__ import annotations

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
