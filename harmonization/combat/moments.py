"""The site and server halves of ComBat's three rounds: what a site sends, what the server
combines (see :mod:`harmonization.combat` for the scheme).

Every array that leaves a site is indexed by design column, batch or feature, never by patient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from common.errors import HarmonizationError
from common.glm import FeatureMoments, combine_feature_moments, site_feature_moments
from harmonization.combat.design import (
    CombatOptions,
    Covariates,
    Design,
    FloatArray,
    IntArray,
    checked_features,
    covariate_column,
)

# --- round 1: design moments ------------------------------------------------------------------

@dataclass(frozen=True)
class DesignMoments:
    """What a site sends in round 1: counts and the sums ``X'X`` (p, p) and ``X'Y`` (p, F)."""
    batch_counts: IntArray  # (n_batch,)
    xtx: FloatArray
    xty: FloatArray

    #: What may leave a site (:func:`common.records.check_sent`): ``columns`` is the design's.
    AXES: ClassVar = {"batch_counts": ("batches",), "xtx": ("columns", "columns"),
                      "xty": ("columns", "features")}
    COUNTS: ClassVar = {"batch_counts": "min_cell"}

    @property
    def n(self) -> int:
        return int(self.batch_counts.sum())


def _check_cells(design: Design, index: IntArray, covariates: Covariates,
                 options: CombatOptions, site: str) -> None:
    """Refuse batches, levels and batch x level cells of 1 to min_cell - 1 patients."""
    # The reasons below name no count: they leave the site, and a count of 1 to min_cell - 1
    # is what the rule protects.
    def small(count: int) -> bool:
        return 0 < count < options.min_cell

    counts = np.bincount(index, minlength=design.n_batch)
    for batch_name, count in zip(design.batches, counts, strict=True):
        if small(int(count)):
            raise HarmonizationError(
                f"site '{site}': batch '{batch_name}' has fewer than min_cell = "
                f"{options.min_cell} patients: its sums would expose them")
    for column, levels in design.categorical:
        values = np.asarray([str(v) for v in covariate_column(covariates, column, len(index))])
        for level in levels:
            at_level = values == level
            if small(int(at_level.sum())):
                raise HarmonizationError(
                    f"site '{site}': covariate '{column}' = '{level}' holds fewer than "
                    f"min_cell = {options.min_cell} patients: X'Y would expose them")
            for b, name in enumerate(design.batches):
                cell = int((at_level & (index == b)).sum())
                if small(cell):
                    raise HarmonizationError(
                        f"site '{site}': batch '{name}' x {column} = '{level}' holds fewer "
                        f"than min_cell = {options.min_cell} patients: X'Y would expose them")


def site_design_moments(y: npt.ArrayLike, batch: Sequence[object], covariates: Covariates,
                        design: Design, options: CombatOptions, site: str = "site"
                        ) -> DesignMoments:
    """Round 1 at a site: ``n`` per batch, ``X'X`` and ``X'Y`` of its training rows."""
    y = checked_features(y, f"site '{site}'")
    if len(batch) != y.shape[0]:
        raise HarmonizationError(f"site '{site}': {len(batch)} batch labels for {y.shape[0]} rows")
    x = design.matrix(batch, covariates)
    index = design.batch_index(batch)
    _check_cells(design, index, covariates, options, site)
    return DesignMoments(np.bincount(index, minlength=design.n_batch), x.T @ x, x.T @ y)


@dataclass(frozen=True)
class LocationFit:
    """What the server returns after round 1: the coefficients (p, F) and the grand mean (F,)."""
    beta: FloatArray
    grand_mean: FloatArray
    batch_counts: IntArray  # (n_batch,) over all sites


def combine_design_moments(parts: Sequence[DesignMoments], design: Design,
                           options: CombatOptions) -> LocationFit:
    """Round 1 at the server: pooled least squares from the summed moments."""
    if not parts:
        raise HarmonizationError("no site sent design moments")
    counts = np.sum([p.batch_counts for p in parts], axis=0)
    # strict=False: as before, a counts vector of another length is not refused here (the
    # server checks the replies' shapes when it unpacks them).
    for name, count in zip(design.batches, counts, strict=False):
        if count < options.min_batch_size:
            raise HarmonizationError(
                f"batch '{name}' has {int(count)} training patients, fewer than min_batch_size "
                f"= {options.min_batch_size}")
    xtx = np.sum([p.xtx for p in parts], axis=0)
    xty = np.sum([p.xty for p in parts], axis=0)
    try:
        beta = np.linalg.solve(xtx, xty)
    except np.linalg.LinAlgError:
        raise HarmonizationError(
            "the ComBat design is singular: a categorical level present in no training row, a "
            "covariate constant within the batches, or covariates that repeat each other"
        ) from None
    if design.ref_index is not None:
        grand_mean = beta[design.ref_index]
    else:
        grand_mean = (counts / counts.sum()) @ beta[: design.n_batch]
    return LocationFit(beta, grand_mean, counts)


# --- round 2: residual sums of squares --------------------------------------------------------

@dataclass(frozen=True)
class ResidualMoments:
    """What a site sends in round 2: per batch, the residual sum of squares (n_batch, F)."""
    batch_counts: IntArray
    rss: FloatArray

    AXES: ClassVar = {"batch_counts": ("batches",), "rss": ("batches", "features")}
    COUNTS: ClassVar = {"batch_counts": "min_cell"}


def site_residual_moments(y: npt.ArrayLike, batch: Sequence[object], covariates: Covariates,
                          design: Design, fit: LocationFit) -> ResidualMoments:
    """Round 2 at a site: per-batch sums of squared residuals of the pooled fit."""
    y = checked_features(y, "residuals")
    x = design.matrix(batch, covariates)
    index = design.batch_index(batch)
    squared = (y - x @ fit.beta) ** 2
    rss = np.zeros((design.n_batch, y.shape[1]))
    np.add.at(rss, index, squared)
    return ResidualMoments(np.bincount(index, minlength=design.n_batch), rss)


def combine_residual_moments(parts: Sequence[ResidualMoments], design: Design) -> FloatArray:
    """Round 2 at the server: the pooled variance (F,), over all rows or the reference batch.
    A feature constant over those rows gets variance 1 (it stays constant).
    """
    counts = np.sum([p.batch_counts for p in parts], axis=0)
    rss = np.sum([p.rss for p in parts], axis=0)
    if design.ref_index is not None:
        var = rss[design.ref_index] / counts[design.ref_index]
    else:
        var = rss.sum(axis=0) / counts.sum()
    return np.where(var == 0, 1.0, var)


# --- round 3: batch moments -----------------------------------------------------------------------

@dataclass(frozen=True)
class BatchMoments:
    """One batch's standardized rows summarized per feature: count, mean, centred sum of
    squares (F,). Enough for both EB variants: sum((s - g)^2) = m2 + n (mean - g)^2."""
    batch: str
    n: int
    mean: FloatArray
    m2: FloatArray


def standardize(y: npt.ArrayLike, batch: Sequence[object], covariates: Covariates, design: Design,
                fit: LocationFit, var_pooled: FloatArray) -> FloatArray:
    """(y - grand mean - covariate effects) / sqrt(pooled variance), (n_samples, F)."""
    x = design.matrix(batch, covariates)
    covariate_effect = x[:, design.n_batch:] @ fit.beta[design.n_batch:]
    return (checked_features(y, "standardize") - fit.grand_mean - covariate_effect) / np.sqrt(
        var_pooled)


def site_batch_moments(standardized: FloatArray, batch: Sequence[object], design: Design
                       ) -> dict[str, BatchMoments]:
    """Round 3 at a site: the moments of each batch it holds (a numerically safe second pass)."""
    index = design.batch_index(batch)
    out = {}
    for b in np.unique(index):
        m = site_feature_moments(standardized[index == b])
        out[design.batches[b]] = BatchMoments(design.batches[b], m.n, m.mean, m.m2)
    return out


def combine_batch_moments(parts: Sequence[BatchMoments]) -> BatchMoments:
    """One batch's moments from the sites that share it (Chan et al.'s pairwise update)."""
    pooled = combine_feature_moments([FeatureMoments(p.n, p.mean, p.m2) for p in parts])
    return BatchMoments(parts[0].batch, pooled.n, pooled.mean, pooled.m2)


# --- message shapes: several batches in one payload ------------------------------------------

@dataclass(frozen=True)
class StackedMoments:
    """The moments of several batches, (k,) counts and (k, F) means and sums of squares."""
    batches: tuple[str, ...]
    n: IntArray
    mean: FloatArray
    m2: FloatArray

    #: ``shared``: at most the batches the server named as shared by several sites.
    AXES: ClassVar = {"batches": ("shared",), "n": ("shared",), "mean": ("shared", "features"),
                      "m2": ("shared", "features")}
    COUNTS: ClassVar = {"n": "min_cell"}

    def __post_init__(self) -> None:
        sizes = {len(self.batches), len(self.n), len(self.mean), len(self.m2)}
        if len(sizes) != 1:
            raise HarmonizationError(f"stacked moments of {len(self.batches)} batches hold "
                                     f"{len(self.n)} counts, {len(self.mean)} means and "
                                     f"{len(self.m2)} sums of squares")

    @classmethod
    def of(cls, moments: Sequence[BatchMoments], n_features: int) -> StackedMoments:
        return cls(tuple(m.batch for m in moments), np.array([m.n for m in moments], dtype=int),
                   np.array([m.mean for m in moments]).reshape(len(moments), n_features),
                   np.array([m.m2 for m in moments]).reshape(len(moments), n_features))

    def unstack(self) -> list[BatchMoments]:
        return [BatchMoments(b, int(n), mean, m2)
                for b, n, mean, m2 in zip(self.batches, self.n, self.mean, self.m2,
                                          strict=True)]


@dataclass(frozen=True)
class PooledVariance:
    """The server's pooled variance per feature, (F,)."""
    var: FloatArray
