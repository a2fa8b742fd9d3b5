"""One model's test metrics at a site, and DeLong's paired comparisons: what the validation
phase sends and what the site's report shows (never a per-patient score)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from common.metrics.classification import classification_table
from common.metrics.discrimination import delong_test
from common.metrics.regression import regression_table
from common.metrics.survival import survival_table
from common.protocol import StudyProtocol, TaskKind


def metrics_of(protocol: StudyProtocol, y: np.ndarray, score: np.ndarray,
               threshold: float = 0.5, seed: int = 0) -> dict[str, object]:
    """One model's metrics on test rows (:mod:`common.metrics`): for classification the AUC with
    DeLong and bootstrap CIs, the metrics at ``threshold`` (a risk), Brier, calibration and the
    binned curves (bins of at least the protocol's ``validation.min_count``); for regression r
    and Spearman with CIs, MAE, RMSE and Bland-Altman."""
    if protocol.task.kind is TaskKind.CLASSIFICATION:
        v = protocol.validation
        return classification_table(y, score, threshold, min_count=v.min_count,
                                    n_bins=v.n_bins, bootstrap=v.bootstrap,
                                    decision_thresholds=v.decision_thresholds, seed=seed)
    return regression_table(y, score)


def survival_metrics_of(protocol: StudyProtocol, y: np.ndarray, score: np.ndarray,
                        train_y: np.ndarray, train_score: np.ndarray, seed: int = 0
                        ) -> dict[str, object]:
    """One Cox model's metrics on test rows (``y``: times and events, (n, 2); ``score``: the
    linear predictor), with the site's training rows and their predictions for the censoring
    distribution and the baseline hazard (:func:`common.metrics.survival.survival_table`):
    Harrell's and Uno's C, the time-dependent AUC and Brier score at the protocol's times, the
    calibration and Kaplan-Meier curves by risk group of at least ``validation.min_count``."""
    v = protocol.validation
    return survival_table(y[:, 0], y[:, 1], score, (train_y[:, 0], train_y[:, 1], train_score),
                          times=v.times, grid=v.km_grid, min_count=v.min_count,
                          bootstrap=v.bootstrap, seed=seed)


def paired_comparisons(y: np.ndarray, scores: dict[str, np.ndarray], reference: str
                       ) -> dict[str, dict[str, float]]:
    """DeLong's paired test of ``reference`` against every other model on the same test rows
    (classification with both classes present; otherwise none)."""
    if reference not in scores or not 0 < y.sum() < len(y):
        return {}
    return {f"{reference} vs {name}": asdict(delong_test(y, scores[reference], score))
            for name, score in scores.items() if name != reference}
