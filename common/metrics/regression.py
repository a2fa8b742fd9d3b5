"""Regression (plasma-cell infiltration): Pearson and Spearman r with Fisher-z CIs (Bonett &
Wright's variance for Spearman), MAE, RMSE, Bland-Altman bias and 95% limits of agreement; the
table a site reports of one regression model, and the keys it may hold."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats

from common.metrics.base import NAN, Z95, nan_if_fails


@dataclass(frozen=True)
class Correlation:
    r: float
    low: float
    high: float
    p_value: float


def _fisher_ci(r: float, se: float) -> tuple[float, float]:
    z = math.atanh(max(min(r, 1 - 1e-15), -1 + 1e-15))
    return math.tanh(z - Z95 * se), math.tanh(z + Z95 * se)


def pearson(y: npt.ArrayLike, prediction: npt.ArrayLike) -> Correlation:
    """Pearson r with its Fisher-z 95% CI (needs 4 or more rows)."""
    y, prediction = np.asarray(y, float), np.asarray(prediction, float)
    if len(y) < 4:
        raise ValueError(f"Pearson r: needs at least 4 rows, got {len(y)}")
    result = stats.pearsonr(prediction, y)
    low, high = _fisher_ci(float(result.statistic), 1 / math.sqrt(len(y) - 3))
    return Correlation(float(result.statistic), low, high, float(result.pvalue))


def spearman(y: npt.ArrayLike, prediction: npt.ArrayLike) -> Correlation:
    """Spearman rho with a Fisher-z 95% CI using Bonett & Wright's variance (1 + rho^2/2)/(n-3)."""
    y, prediction = np.asarray(y, float), np.asarray(prediction, float)
    if len(y) < 4:
        raise ValueError(f"Spearman rho: needs at least 4 rows, got {len(y)}")
    result = stats.spearmanr(prediction, y)
    rho = float(result.statistic)
    low, high = _fisher_ci(rho, math.sqrt((1 + rho**2 / 2) / (len(y) - 3)))
    return Correlation(rho, low, high, float(result.pvalue))


@dataclass(frozen=True)
class Agreement:
    """Bland-Altman: mean difference (prediction - truth) and its 95% limits of agreement."""

    bias: float
    sd: float
    lower: float
    upper: float


def bland_altman(y: npt.ArrayLike, prediction: npt.ArrayLike) -> Agreement:
    d = np.asarray(prediction, float) - np.asarray(y, float)
    if len(d) < 2:
        raise ValueError("Bland-Altman: needs at least 2 rows")
    bias, sd = float(d.mean()), float(d.std(ddof=1))
    return Agreement(bias, sd, bias - Z95 * sd, bias + Z95 * sd)


def regression_table(y: npt.ArrayLike, prediction: npt.ArrayLike) -> dict[str, object]:
    """What a site reports of one regression model on its test rows (NaN where undefined)."""
    y, prediction = np.asarray(y, float), np.asarray(prediction, float)
    error = prediction - y
    out: dict[str, object] = {"n": len(y), "mae": float(np.mean(np.abs(error))),
                              "rmse": float(np.sqrt(np.mean(error**2)))}
    constant = np.std(prediction) == 0 or np.std(y) == 0
    for name, compute in (("r", pearson), ("spearman", spearman)):
        c = None if constant else nan_if_fails(compute, y, prediction)
        out |= {name: c.r if c else NAN, f"{name}_low": c.low if c else NAN,
                f"{name}_high": c.high if c else NAN, f"{name}_p": c.p_value if c else NAN}
    agreement = nan_if_fails(bland_altman, y, prediction)
    out |= {"bias": agreement.bias if agreement else NAN,
            "loa_low": agreement.lower if agreement else NAN,
            "loa_high": agreement.upper if agreement else NAN}
    return out


