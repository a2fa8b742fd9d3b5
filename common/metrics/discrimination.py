"""Discrimination: AUC with its DeLong variance (the fast midrank algorithm of Sun & Xu, IEEE
SPL 2014) and 95% CI, a stratified bootstrap CI, and DeLong's paired test of two models on the
same patients (DeLong, DeLong & Clarke-Pearson, Biometrics 1988). AUC takes any score."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats

from common.metrics.base import Z95, FloatArray, checked_binary
from common.metrics.tables import PairedTest


def _midranks(x: FloatArray) -> FloatArray:
    """1-based ranks with ties given their mean rank."""
    ranks: FloatArray = stats.rankdata(x, method="average")
    return ranks


@dataclass(frozen=True)
class Auc:
    """An AUC with its DeLong variance and 95% CI (clipped to [0, 1], as pROC does)."""

    auc: float
    variance: float
    low: float
    high: float
    n_positive: int
    n_negative: int


def _delong_components(y: FloatArray, scores: FloatArray
                       ) -> tuple[FloatArray, FloatArray, FloatArray]:
    """AUCs (k,) and the structural components V10 (k, m) and V01 (k, n) of ``scores`` (k, N)
    by Sun & Xu's midrank formulation."""
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    v10 = np.empty((scores.shape[0], m))
    v01 = np.empty((scores.shape[0], n))
    aucs = np.empty(scores.shape[0])
    for k, s in enumerate(scores):
        tx, ty, tz = _midranks(s[pos]), _midranks(s[neg]), _midranks(np.concatenate(
            [s[pos], s[neg]]))
        aucs[k] = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
        v10[k] = (tz[:m] - tx) / n
        v01[k] = 1.0 - (tz[m:] - ty) / m
    return aucs, v10, v01


def _delong_covariance(y: FloatArray, scores: FloatArray) -> tuple[FloatArray, FloatArray]:
    aucs, v10, v01 = _delong_components(y, scores)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(aucs), len(aucs)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(aucs), len(aucs)))
    return aucs, s10 / m + s01 / n


def auc_delong(y: npt.ArrayLike, score: npt.ArrayLike) -> Auc:
    """The AUC and its DeLong variance and 95% CI. Needs both classes."""
    y, score = checked_binary(y, score, "AUC")
    m, n = int(y.sum()), int((1 - y).sum())
    if m == 0 or n == 0:
        raise ValueError(f"AUC: needs both classes, got {m} positive and {n} negative")
    aucs, cov = _delong_covariance(y, score[None, :])
    auc, var = float(aucs[0]), float(cov[0, 0])
    half = Z95 * math.sqrt(max(var, 0.0))
    return Auc(auc, var, max(0.0, auc - half), min(1.0, auc + half), m, n)




def delong_test(y: npt.ArrayLike, score_a: npt.ArrayLike, score_b: npt.ArrayLike) -> PairedTest:
    """Two-sided DeLong test of AUC(a) = AUC(b) on the same patients."""
    y, score_a = checked_binary(y, score_a, "DeLong test")
    _, score_b = checked_binary(y, score_b, "DeLong test")
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError("DeLong test: needs both classes")
    aucs, cov = _delong_covariance(y, np.vstack([score_a, score_b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 0:  # identical rankings: no evidence of a difference
        return PairedTest(float(aucs[0]), float(aucs[1]), diff, 0.0, 1.0)
    z = diff / math.sqrt(var)
    return PairedTest(float(aucs[0]), float(aucs[1]), diff, z, float(2 * stats.norm.sf(abs(z))))


def auc_bootstrap_ci(y: npt.ArrayLike, score: npt.ArrayLike, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the AUC from a bootstrap stratified by class (each resample keeps the
    numbers of positives and negatives)."""
    y, score = checked_binary(y, score, "bootstrap AUC")
    pos, neg = score[y == 1], score[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("bootstrap AUC: needs both classes")
    rng = np.random.default_rng(seed)
    p = pos[rng.integers(0, len(pos), (n_boot, len(pos)))]
    q = neg[rng.integers(0, len(neg), (n_boot, len(neg)))]
    # Mann-Whitney by sorting each resample's negatives: P(pos > neg) + 0.5 P(pos = neg)
    q.sort(axis=1)
    below = np.stack([np.searchsorted(q[b], p[b], side="left") for b in range(n_boot)])
    upto = np.stack([np.searchsorted(q[b], p[b], side="right") for b in range(n_boot)])
    aucs = (below + upto).sum(axis=1) / (2.0 * len(pos) * len(neg))
    tail = (1 - level) / 2
    low, high = np.quantile(aucs, [tail, 1 - tail])
    return float(low), float(high)
