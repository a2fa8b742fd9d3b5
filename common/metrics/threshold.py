"""Classification at a threshold: sensitivity, specificity, PPV, NPV, accuracy, F1 and the
confusion matrix. The threshold is fixed on training data: :func:`youden_threshold` on a
training table, or the training prevalence for a calibrated risk model (where the two agree:
Youden's J is largest where the class densities are equal, which for a calibrated risk is where
the risk equals the prevalence)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from common.metrics.base import checked_binary


def youden_threshold(y: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """The score cut-off maximizing sensitivity + specificity - 1 on (training) data; a case is
    positive when its score is >= the cut-off. Ties in J: the highest cut-off."""
    y, score = checked_binary(y, score, "Youden threshold")
    m, n = y.sum(), (1 - y).sum()
    if m == 0 or n == 0:
        raise ValueError("Youden threshold: needs both classes")
    cuts = np.unique(score)
    pos_sorted, neg_sorted = np.sort(score[y == 1]), np.sort(score[y == 0])
    tp = m - np.searchsorted(pos_sorted, cuts, side="left")
    tn = np.searchsorted(neg_sorted, cuts, side="left")
    j = tp / m + tn / n - 1
    return float(cuts[np.flatnonzero(j == j.max())[-1]])


@dataclass(frozen=True)
class AtThreshold:
    """Classification of test rows at a fixed cut-off (score >= threshold is positive)."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    accuracy: float
    f1: float


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def at_threshold(y: npt.ArrayLike, score: npt.ArrayLike, threshold: float) -> AtThreshold:
    y, score = checked_binary(y, score, "threshold metrics")
    predicted = score >= threshold
    tp = int(np.sum(predicted & (y == 1)))
    fp = int(np.sum(predicted & (y == 0)))
    tn = int(np.sum(~predicted & (y == 0)))
    fn = int(np.sum(~predicted & (y == 1)))
    return AtThreshold(float(threshold), tp, fp, tn, fn, _ratio(tp, tp + fn), _ratio(tn, tn + fp),
                       _ratio(tp, tp + fp), _ratio(tn, tn + fn), _ratio(tp + tn, len(y)),
                       _ratio(2 * tp, 2 * tp + fp + fn))
