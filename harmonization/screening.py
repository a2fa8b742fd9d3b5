"""Scanner-robust feature screening: which features still depend on the scanner after
harmonization, measured from sums, split where the data lives.

Location-scale harmonization (ComBat) removes each scanner's mean and spread of a feature. What
it cannot remove is a feature whose *relation to the outcome* differs between scanners: noise,
blur and reconstruction sharpness change a texture feature of infiltrated marrow differently
from one of normal marrow. A model that leans on such a feature fails at a scanner it never saw.

Per feature ``y`` (harmonized), two nested linear models over the training rows of every site:

* reduced: ``y ~ scanner + label + covariates`` (one label effect for all scanners);
* full: ``y ~ scanner + scanner x label + covariates`` (a label effect per scanner).

The **scanner share** is ``(RSS_reduced - RSS_full) / RSS_reduced``: the share of the variance
left by the label, the scanner means and the covariates that the scanner-specific label effects
explain (a partial eta squared), with the F test of the same comparison. For a two-class label
it measures how much the class difference varies between scanners; for a continuous one, the
slope.

Both models are fitted from one set of sums a site sends over its training rows
(:func:`site_interaction_moments`): ``X'X`` of the full design (its batch x label entries count
a batch's positives, cells ComBat's ``protect_outcome`` already requires to hold 0 or at least
``min_cell`` patients), ``X'Y`` and each feature's ``y'y``; the server adds them and solves
(:func:`scanner_shares`), as for a pooled fit. Nothing here does I/O or knows about Flower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt
from scipy import stats

from common.errors import HarmonizationError
from harmonization.combat.design import (
    Covariates,
    Design,
    FloatArray,
    IntArray,
    checked_features,
)


@dataclass(frozen=True)
class InteractionMoments:
    """What a site sends: per batch its count, the full design's ``X'X`` (q, q), ``X'Y`` (q, F)
    and ``y'y`` per feature (F,), summed over its training rows."""
    batch_counts: IntArray
    xtx: FloatArray
    xty: FloatArray
    yty: FloatArray

    #: What may leave a site (:func:`common.records.check_sent`).
    AXES: ClassVar = {"batch_counts": ("batches",), "xtx": ("columns", "columns"),
                      "xty": ("columns", "features"), "yty": ("features",)}
    COUNTS: ClassVar = {"batch_counts": "min_cell"}


def _columns(design: Design, batch: Sequence[object], label: npt.ArrayLike,
             covariates: Covariates) -> FloatArray:
    """The full design: batch indicators, the label within each batch, the covariates (the
    design's categorical indicators and continuous columns, without its ``fit_only`` ones)."""
    index = design.batch_index(batch)
    y = np.asarray(label, dtype=np.float64)
    indicators = np.zeros((len(index), design.n_batch))
    indicators[np.arange(len(index)), index] = 1.0
    # the label is modelled explicitly here, so the design's fit_only columns are left out
    return np.hstack([indicators, indicators * y[:, None],
                      design.applied_matrix(batch, covariates)])


def site_interaction_moments(y: npt.ArrayLike, batch: Sequence[object], label: npt.ArrayLike,
                             covariates: Covariates, design: Design) -> InteractionMoments:
    """A site's sums over its (harmonized) training rows ``y`` (n, F)."""
    y = checked_features(y, "scanner screening")
    label = np.asarray(label, dtype=np.float64)
    if label.shape != (y.shape[0],) or not np.all(np.isfinite(label)):
        raise HarmonizationError(f"labels must be finite, one per row ({y.shape[0]})")
    x = _columns(design, batch, label, covariates)
    counts = np.bincount(design.batch_index(batch), minlength=design.n_batch)
    return InteractionMoments(counts, x.T @ x, x.T @ y, np.einsum("ij,ij->j", y, y))


@dataclass(frozen=True)
class ScannerShares:
    """Per feature: the scanner share, the F statistic and its p-value; and the degrees of
    freedom of the test (batches with a label effect of their own, residual)."""
    share: FloatArray
    f: FloatArray
    p: FloatArray
    df: tuple[int, int]


def _rss(xtx: FloatArray, xty: FloatArray, yty: FloatArray) -> tuple[FloatArray, int]:
    """Residual sums of squares of least squares from the normal equations, and the rank."""
    u, s, vt = np.linalg.svd(xtx, hermitian=True)
    keep = s > s[0] * 1e-10
    inverse = (vt[keep].T / s[keep]) @ u[:, keep].T
    beta = inverse @ xty
    return yty - np.einsum("ij,ij->j", beta, xty), int(keep.sum())


def scanner_shares(parts: Sequence[InteractionMoments], design: Design) -> ScannerShares:
    """The pooled comparison of the reduced and the full model (see the module docstring)."""
    if not parts:
        raise HarmonizationError("no site sent screening sums")
    xtx = np.sum([p.xtx for p in parts], axis=0)
    xty = np.sum([p.xty for p in parts], axis=0)
    yty = np.sum([p.yty for p in parts], axis=0)
    n = int(np.sum([p.batch_counts.sum() for p in parts]))
    b = design.n_batch
    # The reduced design replaces the per-batch label columns by their sum (one label effect).
    q = xtx.shape[0]
    t = np.zeros((q, q - b + 1))
    t[:b, :b] = np.eye(b)
    t[b:2 * b, b] = 1.0
    t[2 * b:, b + 1:] = np.eye(q - 2 * b)
    full, rank_full = _rss(xtx, xty, yty)
    reduced, rank_reduced = _rss(t.T @ xtx @ t, t.T @ xty, yty)
    full = np.maximum(full, 0.0)
    reduced = np.maximum(reduced, full)
    df1, df2 = rank_full - rank_reduced, n - rank_full
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(reduced > 0, (reduced - full) / reduced, 0.0)
        f = np.where(full > 0, (reduced - full) / max(df1, 1) / (full / max(df2, 1)), 0.0)
    p = stats.f.sf(f, df1, df2) if df1 > 0 and df2 > 0 else np.ones_like(f)
    return ScannerShares(share, f, p, (df1, df2))
