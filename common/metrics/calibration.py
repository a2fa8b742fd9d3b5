"""Calibration and clinical utility of predicted risks in (0, 1).

* **Calibration**: Brier score, calibration intercept (calibration-in-the-large, slope fixed at
  one) and slope by logistic recalibration (Cox 1958; Van Calster et al., JCE 2016), the
  calibration curve in bins of at least ``min_count`` patients.
* **Clinical utility**: the decision curve, net benefit against treat-all (Vickers & Elkin 2006).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import special

from common.metrics.base import NAN, FloatArray, checked_binary


def _risk(p: FloatArray, what: str) -> FloatArray:
    if np.any((p <= 0) | (p >= 1)):
        raise ValueError(f"{what}: risks must lie strictly between 0 and 1")
    return p


def brier_score(y: npt.ArrayLike, risk: npt.ArrayLike) -> float:
    y, risk = checked_binary(y, risk, "Brier score")
    return float(np.mean((risk - y) ** 2))


def _logistic_fit(y: FloatArray, x: FloatArray, offset: FloatArray) -> FloatArray:
    """Unpenalized maximum likelihood of y ~ x (columns) + offset, by Newton's method."""
    beta = np.zeros(x.shape[1])
    for _ in range(100):
        eta = x @ beta + offset
        p = special.expit(eta)  # overflow-free for a large |eta|
        grad = x.T @ (y - p)
        hess = (x * (p * (1 - p))[:, None]).T @ x
        step = np.linalg.solve(hess, grad)
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10:
            return beta
    raise ValueError("calibration: logistic recalibration did not converge (separable data)")


@dataclass(frozen=True)
class Calibration:
    """Calibration intercept (slope fixed at 1; 0 is ideal) and slope (1 is ideal)."""

    intercept: float
    slope: float


def calibration(y: npt.ArrayLike, risk: npt.ArrayLike) -> Calibration:
    """Logistic recalibration of predicted risks on observed outcomes."""
    y, risk = checked_binary(y, risk, "calibration")
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError("calibration: needs both classes")
    lp = np.log(_risk(risk, "calibration") / (1 - risk))
    intercept = _logistic_fit(y, np.ones((len(y), 1)), lp)[0]
    slope = _logistic_fit(y, np.column_stack([np.ones(len(y)), lp]), np.zeros(len(y)))[1]
    return Calibration(float(intercept), float(slope))


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of the calibration curve: its patients' mean risk and observed event rate."""

    n: int
    mean_risk: float
    observed: float


def calibration_curve(y: npt.ArrayLike, risk: npt.ArrayLike, n_bins: int = 10, min_count: int = 5
                      ) -> list[CalibrationBin]:
    """Bins of equal size by predicted risk (at most ``n_bins``, each of at least ``min_count``
    patients; fewer bins when the rows are few). Fewer than ``min_count`` rows: no curve."""
    y, risk = checked_binary(y, risk, "calibration curve")
    if min_count < 1 or n_bins < 1:
        raise ValueError("calibration curve: n_bins and min_count must be >= 1")
    k = min(n_bins, len(y) // min_count)
    if k == 0:
        return []
    order = np.argsort(risk, kind="stable")
    return [CalibrationBin(len(part), float(risk[part].mean()), float(y[part].mean()))
            for part in np.array_split(order, k)]


@dataclass(frozen=True)
class DecisionPoint:
    """Net benefit at a threshold probability: the model, and treating every patient."""

    threshold: float
    model: float
    treat_all: float


def decision_curve(y: npt.ArrayLike, risk: npt.ArrayLike,
                   thresholds: Sequence[float] = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2)),
                   min_count: int = 1) -> list[DecisionPoint]:
    """Net benefit = TP/N - FP/N x pt / (1 - pt) at threshold probabilities pt.

    Net benefit at two thresholds gives the positives and negatives whose risk lies between
    them, so the model's net benefit is NaN at every threshold that would tell apart a group of
    fewer than ``min_count`` patients (:func:`coarse_thresholds`): a curve never splits off
    fewer patients than a calibration bin holds. Every threshold keeps its point (treating all
    depends on the prevalence only), so the curve's length is the protocol's, not the data's."""
    y, risk = checked_binary(y, risk, "decision curve")
    n, prevalence = len(y), float(y.mean())
    for pt in thresholds:
        if not 0 < pt < 1:
            raise ValueError(f"decision curve: threshold {pt} is not strictly between 0 and 1")
    kept = set(coarse_thresholds(risk, thresholds, min_count))
    points = []
    for pt in thresholds:
        odds = pt / (1 - pt)
        treat = risk >= pt
        tp, fp = np.sum(treat & (y == 1)), np.sum(treat & (y == 0))
        model = float(tp / n - fp / n * odds) if float(pt) in kept else NAN
        points.append(DecisionPoint(float(pt), model,
                                    float(prevalence - (1 - prevalence) * odds)))
    return points


def coarse_thresholds(risk: npt.ArrayLike, thresholds: Sequence[float], min_count: int
                      ) -> list[float]:
    """The ascending ``thresholds`` to keep so that the patients below the first, between any
    two consecutive ones and at or above the last number 0 or at least ``min_count`` (greedy
    from the lowest: a threshold is kept when the group it closes and the group above it both
    qualify)."""
    risk = np.sort(np.asarray(risk, float))

    def ok(count: int) -> bool:
        return count == 0 or count >= min_count

    kept: list[float] = []
    below = 0  # patients under the last kept threshold
    for pt in sorted(set(float(t) for t in thresholds)):
        under = int(np.searchsorted(risk, pt, side="left"))  # risk < pt
        if ok(under - below) and ok(len(risk) - under):
            kept.append(pt)
            below = under
    return kept
