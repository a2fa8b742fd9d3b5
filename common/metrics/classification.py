"""A logistic model's metrics on a site's test rows: the table a site reports (discrimination,
the classification at the training threshold, calibration and the decision curve), and the keys
it may hold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import numpy.typing as npt
from scipy import special

from common.metrics.base import NAN, FloatArray, checked_binary, nan_if_fails
from common.metrics.calibration import (
    brier_score,
    calibration,
    calibration_curve,
    decision_curve,
)
from common.metrics.discrimination import auc_bootstrap_ci, auc_delong
from common.metrics.threshold import at_threshold


def risk_of(score: npt.ArrayLike) -> FloatArray:
    """A logistic model's linear predictor as a risk, kept inside (0, 1)."""
    risk: FloatArray = np.clip(special.expit(np.asarray(score, float)), 1e-12, 1 - 1e-12)
    return risk


def classification_table(y: npt.ArrayLike, score: npt.ArrayLike, threshold: float, *,
                         min_count: int = 5, n_bins: int = 10, bootstrap: int = 1000,
                         decision_thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5),
                         seed: int = 0) -> dict[str, object]:
    """Everything a site reports of one logistic model (``score``: its linear predictor) on its
    test rows: flat numbers (NaN where a metric is undefined, e.g. AUC with one class), and the
    calibration and decision curves as lists of rows, each telling apart groups of 0 or at
    least ``min_count`` patients. ``threshold`` is on the risk scale."""
    y, score = checked_binary(y, score, "test metrics")
    risk = risk_of(score)
    both = 0 < y.sum() < len(y)
    out: dict[str, object] = {"n": len(y), "n_positive": int(y.sum())}
    auc = auc_delong(y, score) if both else None
    out |= {"auc": auc.auc if auc else NAN, "auc_variance": auc.variance if auc else NAN,
            "auc_low": auc.low if auc else NAN, "auc_high": auc.high if auc else NAN}
    boot = auc_bootstrap_ci(y, score, bootstrap, seed) if both and bootstrap else (NAN, NAN)
    out |= {"auc_boot_low": boot[0], "auc_boot_high": boot[1]}
    cut = at_threshold(y, risk, threshold)
    out |= asdict(cut)
    out["brier"] = brier_score(y, risk)
    cal = nan_if_fails(calibration, y, risk) if both else None
    out |= {"calibration_intercept": cal.intercept if cal else NAN,
            "calibration_slope": cal.slope if cal else NAN}
    out["calibration_curve"] = [[b.n, b.mean_risk, b.observed]
                                for b in calibration_curve(y, risk, n_bins, min_count)]
    out["decision_curve"] = [[d.threshold, d.model, d.treat_all]
                             for d in decision_curve(y, risk, decision_thresholds, min_count)]
    return out


