"""A batch's ComBat adjustment: the empirical Bayes (or plain) estimate of its location and
scale effects from its moments alone (Johnson et al. 2007, as neuroCombat computes it).

It runs where the batch's moments are: at the site that holds the batch, or at the server for a
batch spread over sites; both EB variants depend on a batch's rows only through its count, mean
and centred sum of squares per feature, so the result is the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import HarmonizationError
from harmonization.combat.design import CombatOptions, FloatArray
from harmonization.combat.moments import BatchMoments


@dataclass(frozen=True)
class BatchAdjustment:
    """A batch's location (gamma*) and scale (delta*) effects on the standardized scale, (F,)."""
    batch: str
    gamma: FloatArray
    delta: FloatArray


def estimate_batch_adjustment(moments: BatchMoments, options: CombatOptions
                              ) -> BatchAdjustment:
    """The EB (or plain) estimate of one batch's effects from its moments alone.
    Runs where the batch's moments are: at the site that holds the batch, or at the server for a
    batch spread over sites. The reference batch gets no adjustment (gamma 0, delta 1).
    """
    n_features = moments.mean.shape[0]
    if moments.batch == options.ref_batch:
        return BatchAdjustment(moments.batch, np.zeros(n_features), np.ones(n_features))
    if moments.n < 2:
        raise HarmonizationError(f"batch '{moments.batch}' has fewer than 2 rows")
    n = moments.n
    gamma_hat = moments.mean.copy()
    if options.mean_only:
        delta_hat = np.ones(n_features)
    else:
        delta_hat = moments.m2 / (n - 1)
        delta_hat[delta_hat == 0] = 1.0
    if not options.eb:
        return BatchAdjustment(moments.batch, gamma_hat, delta_hat)
    if n_features < 2:
        raise HarmonizationError("empirical Bayes needs two or more features (use eb=False)")
    gamma_bar = gamma_hat.mean()
    t2 = gamma_hat.var(ddof=1)
    if options.parametric:
        if options.mean_only:  # neuroCombat / sva: postmean with n = 1, d* = 1
            return BatchAdjustment(moments.batch, (t2 * gamma_hat + gamma_bar) / (t2 + 1.0),
                                   np.ones(n_features))
        gamma, delta = _parametric_eb(moments, gamma_hat, delta_hat, gamma_bar, t2, options)
    else:
        gamma, delta = _nonparametric_eb(moments, gamma_hat, delta_hat)
    return BatchAdjustment(moments.batch, gamma, delta)


def _parametric_eb(m: BatchMoments, gamma_hat: FloatArray, delta_hat: FloatArray,
                   gamma_bar: float, t2: float, options: CombatOptions
                   ) -> tuple[FloatArray, FloatArray]:
    """Iterate the posterior means from the batch estimates until the largest relative change
    is at most ``options.tolerance`` (Johnson et al.'s inverse-gamma prior on delta)."""
    mean, s2 = delta_hat.mean(), delta_hat.var(ddof=1)
    a = (2.0 * s2 + mean**2) / s2
    b = (mean * s2 + mean**3) / s2
    n = m.n
    g_old, d_old = gamma_hat, delta_hat
    for _ in range(10_000):
        g_new = (t2 * n * gamma_hat + d_old * gamma_bar) / (t2 * n + d_old)
        sum2 = m.m2 + n * (m.mean - g_new) ** 2
        d_new = (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero estimate, as neuroCombat
            change = max(np.max(np.abs(g_new - g_old) / g_old),
                         np.max(np.abs(d_new - d_old) / d_old))
        g_old, d_old = g_new, d_new
        if not change > options.tolerance:
            return g_new, d_new
    raise HarmonizationError(f"batch '{m.batch}': empirical Bayes did not converge")


def _nonparametric_eb(m: BatchMoments, gamma_hat: FloatArray, delta_hat: FloatArray
                      ) -> tuple[FloatArray, FloatArray]:
    """Each feature's effects as the likelihood-weighted average of the other features'
    estimates (Johnson et al.'s non-parametric prior), in the log domain so that large batches
    do not underflow."""
    n, f = m.n, gamma_hat.shape[0]
    gamma, delta = np.empty(f), np.empty(f)
    log_norm = -0.5 * n * np.log(2.0 * math.pi * delta_hat)  # (F,) over the prior features j
    for start in range(0, f, 256):
        rows = slice(start, min(start + 256, f))
        sum2 = m.m2[rows, None] + n * (m.mean[rows, None] - gamma_hat[None, :]) ** 2
        log_lh = log_norm[None, :] - sum2 / (2.0 * delta_hat[None, :])
        own = np.arange(rows.stop - start)
        log_lh[own, start + own] = -np.inf  # leave the feature itself out
        weights = np.exp(log_lh - log_lh.max(axis=1, keepdims=True))
        total = weights.sum(axis=1)
        gamma[rows] = weights @ gamma_hat / total
        delta[rows] = weights @ delta_hat / total
    return gamma, delta


@dataclass(frozen=True)
class StackedAdjustments:
    """The EB estimates of several batches, (k, F) each."""
    batches: tuple[str, ...]
    gamma: FloatArray
    delta: FloatArray

    def __post_init__(self) -> None:
        if not len(self.batches) == len(self.gamma) == len(self.delta):
            raise HarmonizationError(f"stacked adjustments of {len(self.batches)} batches hold "
                                     f"{len(self.gamma)} gammas and {len(self.delta)} deltas")

    @classmethod
    def of(cls, adjustments: Sequence[BatchAdjustment], n_features: int) -> StackedAdjustments:
        return cls(tuple(a.batch for a in adjustments),
                   np.array([a.gamma for a in adjustments]).reshape(len(adjustments), n_features),
                   np.array([a.delta for a in adjustments]).reshape(len(adjustments), n_features))

    def unstack(self) -> dict[str, BatchAdjustment]:
        return {b: BatchAdjustment(b, g, d)
                for b, g, d in zip(self.batches, self.gamma, self.delta, strict=True)}
