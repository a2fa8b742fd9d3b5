"""Screening and standardization from the sites' comoments: the pooled standardization, each
feature's correlation with the label, the ``top_k`` features kept, the null model and the
smallest penalty that keeps every coefficient at zero."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

import numpy as np
import numpy.typing as npt

from common.cox import null_martingale_residuals
from common.glm import ModelError

FloatArray: TypeAlias = npt.NDArray[np.float64]
IndexArray: TypeAlias = npt.NDArray[np.int64]  # feature indices, fold numbers


@dataclass(frozen=True)
class Comoments:
    """Per-feature count, mean and centred sum of squares, (F,), the label's mean and centred sum
    of squares, and the centred cross-products of each feature with the label, (F,)."""

    n: int
    mean: FloatArray
    m2: FloatArray
    y_mean: float
    y_m2: float
    cross: FloatArray

    #: What may leave a site (:func:`common.records.check_sent`).
    AXES: ClassVar = {"mean": ("features",), "m2": ("features",), "cross": ("features",)}
    COUNTS: ClassVar = {"n": "min_rows"}

    @property
    def sd(self) -> FloatArray:
        """Population SD, with 1 where a feature is constant (it then stays at zero)."""
        sd = np.sqrt(self.m2 / self.n)
        return np.where(sd > 0, sd, 1.0)

    def correlation(self) -> FloatArray:
        """Pearson r of each feature with the label (0 where either is constant)."""
        denominator = np.sqrt(self.m2 * self.y_m2)
        return np.divide(self.cross, denominator, out=np.zeros_like(self.cross),
                         where=denominator > 0)


def site_comoments(x: npt.ArrayLike, y: npt.ArrayLike) -> Comoments:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ModelError(f"comoments need (n, F) features and (n,) labels, got {x.shape}, "
                         f"{y.shape}")
    mean, y_mean = x.mean(axis=0), float(y.mean())
    xc, yc = x - mean, y - y_mean
    return Comoments(x.shape[0], mean, (xc**2).sum(axis=0), y_mean, float(yc @ yc), xc.T @ yc)


def combine_comoments(parts: Sequence[Comoments]) -> Comoments:
    """Pooled comoments (Chan et al.'s pairwise update, exact up to rounding)."""
    if not parts:
        raise ModelError("no site sent comoments")
    total = parts[0]
    for part in parts[1:]:
        n = total.n + part.n
        dx, dy = part.mean - total.mean, part.y_mean - total.y_mean
        w = total.n * part.n / n
        total = Comoments(n, total.mean + dx * part.n / n, total.m2 + part.m2 + dx**2 * w,
                          total.y_mean + dy * part.n / n, total.y_m2 + part.y_m2 + dy**2 * w,
                          total.cross + part.cross + dx * dy * w)
    return total


def screen(moments: Comoments, top_k: int) -> IndexArray:
    """Indices of the ``top_k`` features with the largest |r| with the label (ties by index),
    in increasing order; constant features never pass."""
    r = np.abs(moments.correlation())
    order = np.lexsort((np.arange(r.size), -r))
    keep = [i for i in order[:top_k] if moments.m2[i] > 0]
    if not keep:
        raise ModelError("no feature varies across the training rows")
    return np.sort(np.asarray(keep, dtype=np.int64))


def lambda_max(moments: Comoments, features: IndexArray) -> float:
    """The smallest L1 penalty at which every coefficient of the standardized GLM is zero: the
    largest |gradient| / n at the intercept-only fit, ``|cross_j| / (n sd_j)`` for both losses."""
    return float(np.max(np.abs(moments.cross[features]) / (moments.n * moments.sd[features])))


def screening_label(y: npt.ArrayLike, loss: str) -> FloatArray:
    """What the comoments correlate the features with: the label, or for the Cox loss (``y``:
    times and events, (n, 2)) the site's null martingale residuals, whose cross-products with
    the features are the Cox score at zero (:func:`common.cox.null_martingale_residuals`); they
    sum to zero at every site, so the pooled cross-products are the stratified score exactly,
    and :func:`lambda_max` holds for the Cox loss as for the others."""
    y = np.asarray(y, dtype=np.float64)
    if loss != "cox":
        return y
    if y.ndim != 2 or y.shape[1] != 2:
        raise ModelError(f"the Cox loss needs (n, 2) times and events, got {y.shape}")
    return null_martingale_residuals(y[:, 0], y[:, 1])


def null_intercept(moments: Comoments, loss: str) -> float:
    """The intercept-only fit: the label's mean (Gaussian), its logit (logistic), or 0 (the
    Cox model has none: the baseline hazard takes its place)."""
    if loss == "cox":
        return 0.0
    if loss == "gaussian":
        return moments.y_mean
    p = min(max(moments.y_mean, 1e-6), 1 - 1e-6)
    return float(np.log(p / (1 - p)))
