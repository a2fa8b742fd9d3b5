"""Across sites: the DerSimonian-Laird random-effects pooled estimate with its CI, Cochran's Q
and I-squared (Higgins & Thompson 2002), for the forest plot of per-site AUCs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from common.metrics.base import Z95


@dataclass(frozen=True)
class Pooled:
    """The random-effects (DerSimonian-Laird) pooled estimate and the heterogeneity of k sites."""

    estimate: float
    low: float
    high: float
    tau2: float
    q: float
    i2: float        # share of the variation due to heterogeneity, 0..1
    p_value: float   # Cochran's Q test of homogeneity
    k: int


def pool_random_effects(estimates: Sequence[float], variances: Sequence[float]) -> Pooled:
    """DerSimonian-Laird pooling of per-site estimates (e.g. AUCs with their DeLong variances)."""
    est, var = np.asarray(estimates, float), np.asarray(variances, float)
    if len(est) != len(var) or len(est) < 2:
        raise ValueError("pooling: needs two or more estimates, each with its variance")
    if np.any(var <= 0) or not np.all(np.isfinite(est)):
        raise ValueError("pooling: every variance must be positive and every estimate finite")
    w = 1 / var
    fixed = float(np.sum(w * est) / w.sum())
    q = float(np.sum(w * (est - fixed) ** 2))
    df = len(est) - 1
    tau2 = max(0.0, (q - df) / (w.sum() - np.sum(w**2) / w.sum()))
    w_star = 1 / (var + tau2)
    pooled = float(np.sum(w_star * est) / w_star.sum())
    se = math.sqrt(1 / w_star.sum())
    i2 = max(0.0, (q - df) / q) if q > 0 else 0.0
    return Pooled(pooled, pooled - Z95 * se, pooled + Z95 * se, float(tau2), q, i2,
                  float(stats.chi2.sf(q, df)), len(est))
