"""ComBat, split where the data lives: federated ComBat equal to centralized ComBat.

The model and its options follow Johnson et al. (2007) as implemented in Fortin's neuroCombat:
a design of batch indicators (no intercept), categorical covariates (first level dropped) and
continuous covariates; the grand mean weighted by batch size (or a reference batch's); the pooled
variance over all rows (or the reference batch's); parametric or non-parametric empirical Bayes,
``mean_only``, no EB. The distributed scheme is d-ComBat's (Chen et al., NeuroImage 2022):

1. each site sends ``n``, ``X'X`` and ``X'Y`` (:func:`site_design_moments`); the server solves
   for the coefficients (:func:`combine_design_moments`);
2. each site sends per-batch residual sums of squares (:func:`site_residual_moments`); the
   server returns the pooled variance (:func:`combine_residual_moments`);
3. each site standardizes its rows and summarizes each batch by its count, mean and centred sum
   of squares (:func:`site_batch_moments`). A batch held by one site is adjusted there
   (:func:`estimate_batch_adjustment`); a batch spread over sites is combined by the server
   (:func:`combine_batch_moments`) and adjusted there. Both EB variants depend on a batch's rows
   only through these three numbers per feature, so the result is the same.
4. each site applies the fitted :class:`CombatModel` to its own rows, training and held-out.

Nothing here does I/O or knows about Flower; :func:`fit_combat` drives the halves in-process.
Every array that leaves a site is indexed by design column, batch or feature, never by patient.
Arrays are samples x features (``(n_samples, n_features)``), float64.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict as dataclasses_asdict
from dataclasses import dataclass, field
from typing import ClassVar, TypeAlias

import numpy as np
import numpy.typing as npt

from common.errors import HarmonizationError
from common.glm import FeatureMoments, combine_feature_moments, site_feature_moments

Covariates = Mapping[str, Sequence[object]]
FloatArray: TypeAlias = npt.NDArray[np.float64]
IntArray: TypeAlias = npt.NDArray[np.intp]


@dataclass(frozen=True)
class CombatOptions:
    """How ComBat estimates the batch effects, and the privacy guards.
    ``min_batch_size``: a smaller batch is refused (its estimates would be unstable and its sums
    close to a patient's values). ``min_cell``: at a site, a batch, a categorical level or a
    batch x level cell holding 1 to ``min_cell - 1`` patients is refused, since ``X'Y`` would
    expose them.
    """
    eb: bool = True
    parametric: bool = True
    mean_only: bool = False
    ref_batch: str | None = None
    min_batch_size: int = 10
    min_cell: int = 5
    tolerance: float = 1e-4  # EB iterations stop at this max relative change (neuroCombat)


@dataclass(frozen=True)
class Design:
    """The ComBat design: batch indicators, then categorical indicators (first level dropped),
    then continuous covariates. With a reference batch its indicator column is all ones.

    ``categorical`` pairs a column with its global levels (every site uses the same list; a site
    may lack a level). neuroCombat orders batches and levels by sorting them; so does
    :meth:`from_values`.

    ``fit_only`` names covariates that the *estimation* protects but that are unknown where the
    model is applied, above all the outcome label: where scanners differ in case mix (referral
    pathways send suspected myeloma to one scanner) a batch mean without the label holds part of
    the label's effect, and removing it removes signal. :meth:`CombatModel.transform` does not
    read these columns: their effect stays in the harmonized values (scaled, like the residuals,
    by the batch's 1/sqrt(delta*)), so training and held-out rows are harmonized alike.
    """
    batches: tuple[str, ...]
    categorical: tuple[tuple[str, tuple[str, ...]], ...] = ()
    continuous: tuple[str, ...] = ()
    ref_batch: str | None = None
    fit_only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(set(self.batches)) != len(self.batches) or not self.batches:
            raise HarmonizationError(f"batches must be distinct and at least one: {self.batches}")
        if self.ref_batch is not None and self.ref_batch not in self.batches:
            raise HarmonizationError(
                f"reference batch '{self.ref_batch}' is not one of {list(self.batches)}")
        for column, levels in self.categorical:
            if len(levels) < 2 or len(set(levels)) != len(levels):
                raise HarmonizationError(
                    f"categorical covariate '{column}' needs two or more distinct levels, "
                    f"got {list(levels)}")
        unknown = set(self.fit_only) - {c for c, _ in self.categorical} - set(self.continuous)
        if unknown:
            raise HarmonizationError(f"fit_only names {sorted(unknown)}, which are not "
                                     "covariates of the design")

    @classmethod
    def from_values(cls, batch: Sequence[object], covariates: Covariates,
                    categorical: Sequence[str] = (), continuous: Sequence[str] = (),
                    ref_batch: str | None = None) -> Design:
        """The design of a pooled table: batches and levels as the sorted values present."""
        return cls(tuple(sorted({str(b) for b in batch})),
                   tuple((c, tuple(sorted({str(v) for v in covariates[c]}))) for c in categorical),
                   tuple(continuous), ref_batch)

    @property
    def n_batch(self) -> int:
        return len(self.batches)

    @property
    def n_columns(self) -> int:
        return self.n_batch + sum(len(lv) - 1 for _, lv in self.categorical) + len(
            self.continuous)

    @property
    def ref_index(self) -> int | None:
        return None if self.ref_batch is None else self.batches.index(self.ref_batch)

    def applied(self) -> npt.NDArray[np.bool_]:
        """Which covariate columns (after the batch indicators) :meth:`CombatModel.transform`
        uses: all but those of :attr:`fit_only`, (n_columns - n_batch,) booleans."""
        return np.array([c not in self.fit_only for c, lv in self.categorical
                         for _ in lv[1:]] + [c not in self.fit_only for c in self.continuous],
                        dtype=bool)

    def batch_index(self, batch: Sequence[object]) -> IntArray:
        """Each row's batch as an index into :attr:`batches` (unknown batch: refused)."""
        lookup = {b: i for i, b in enumerate(self.batches)}
        try:
            return np.fromiter((lookup[str(b)] for b in batch), dtype=np.intp, count=len(batch))
        except KeyError as exc:
            raise HarmonizationError(
                f"batch '{exc.args[0]}' is not in the fitted batches {list(self.batches)}"
            ) from None

    def matrix(self, batch: Sequence[object], covariates: Covariates) -> FloatArray:
        """The design matrix, (n_samples, n_columns)."""
        n = len(batch)
        index = self.batch_index(batch)
        blocks = [np.zeros((n, self.n_batch))]
        blocks[0][np.arange(n), index] = 1.0
        if self.ref_index is not None:
            blocks[0][:, self.ref_index] = 1.0
        for column, levels in self.categorical:
            values = [str(v) for v in _column(covariates, column, n)]
            unknown = sorted(set(values) - set(levels))
            if unknown:
                raise HarmonizationError(
                    f"categorical covariate '{column}' has levels {unknown} outside the study's "
                    f"{list(levels)}")
            blocks.append(np.array([[v == level for level in levels[1:]] for v in values],
                                   dtype=float).reshape(n, len(levels) - 1))
        for column in self.continuous:
            try:
                numbers = np.asarray(_column(covariates, column, n), dtype=float)
            except (TypeError, ValueError):
                raise HarmonizationError(
                    f"continuous covariate '{column}' holds non-numeric values") from None
            if not np.all(np.isfinite(numbers)):
                raise HarmonizationError(
                    f"continuous covariate '{column}' holds missing or infinite values")
            blocks.append(numbers.reshape(n, 1))
        return np.hstack(blocks)


def _column(covariates: Covariates, column: str, n: int) -> Sequence[object]:
    if column not in covariates:
        raise HarmonizationError(f"covariate '{column}' is missing")
    values = covariates[column]
    if len(values) != n:
        raise HarmonizationError(f"covariate '{column}' has {len(values)} values for {n} rows")
    return values


def _features(y: npt.ArrayLike, where: str) -> FloatArray:
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2:
        raise HarmonizationError(f"{where}: features must be (n_samples, n_features), got shape "
                                 f"{y.shape}")
    if not np.all(np.isfinite(y)):
        raise HarmonizationError(f"{where}: features hold missing or infinite values")
    return y


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
    def small(count: int) -> bool:
        return 0 < count < options.min_cell

    counts = np.bincount(index, minlength=design.n_batch)
    for batch_name, count in zip(design.batches, counts, strict=True):
        if small(int(count)):
            raise HarmonizationError(
                f"site '{site}': batch '{batch_name}' has {count} patients, fewer than min_cell = "
                f"{options.min_cell}: its sums would expose them")
    for column, levels in design.categorical:
        values = np.asarray([str(v) for v in _column(covariates, column, len(index))])
        for level in levels:
            at_level = values == level
            if small(int(at_level.sum())):
                raise HarmonizationError(
                    f"site '{site}': covariate '{column}' = '{level}' holds {int(at_level.sum())} "
                    f"patients, fewer than min_cell = {options.min_cell}: X'Y would expose them")
            for b, name in enumerate(design.batches):
                cell = int((at_level & (index == b)).sum())
                if small(cell):
                    raise HarmonizationError(
                        f"site '{site}': batch '{name}' x {column} = '{level}' holds {cell} "
                        f"patients, fewer than min_cell = {options.min_cell}: X'Y would expose "
                        "them")


def site_design_moments(y: npt.ArrayLike, batch: Sequence[object], covariates: Covariates,
                        design: Design, options: CombatOptions, site: str = "site"
                        ) -> DesignMoments:
    """Round 1 at a site: ``n`` per batch, ``X'X`` and ``X'Y`` of its training rows."""
    y = _features(y, f"site '{site}'")
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
    y = _features(y, "residuals")
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


# --- round 3: batch moments and the empirical Bayes adjustment --------------------------------

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
    return (_features(y, "standardize") - fit.grand_mean - covariate_effect) / np.sqrt(
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


# --- the fitted model and the in-process driver -----------------------------------------------

@dataclass(frozen=True)
class CombatModel:
    """Fitted ComBat: apply it to training or held-out rows of the fitted batches."""
    design: Design
    options: CombatOptions
    beta: FloatArray         # (p, F)
    grand_mean: FloatArray   # (F,)
    var_pooled: FloatArray   # (F,)
    gamma: FloatArray        # (n_batch, F) on the standardized scale
    delta: FloatArray        # (n_batch, F)
    batch_counts: IntArray = field(default_factory=lambda: np.zeros(0, dtype=int))

    def transform(self, y: npt.ArrayLike, batch: Sequence[object], covariates: Covariates
                  ) -> FloatArray:
        """Harmonize rows: remove their batch's effects, keep the covariates' effects.

        Rows of the reference batch come back unchanged. Needs the covariates the model
        preserves, except those of ``design.fit_only`` (not read: see :class:`Design`).
        """
        y = _features(y, "transform")
        if y.shape[1] != self.grand_mean.shape[0]:
            raise HarmonizationError(f"rows have {y.shape[1]} features, the model "
                                     f"{self.grand_mean.shape[0]}")
        design = self.design
        known = dict(covariates)
        levels = dict(design.categorical)
        for column in design.fit_only:  # placeholders: their columns are not applied
            known[column] = [levels[column][0] if column in levels else 0.0] * len(batch)
        x = design.matrix(batch, known)
        applied = design.applied()
        effect = x[:, design.n_batch:][:, applied] @ self.beta[design.n_batch:][applied]
        index = design.batch_index(batch)
        s = (y - self.grand_mean - effect) / np.sqrt(self.var_pooled)
        s = (s - self.gamma[index]) / np.sqrt(self.delta[index])
        out = s * np.sqrt(self.var_pooled) + self.grand_mean + effect
        if self.design.ref_index is not None:
            keep = index == self.design.ref_index
            out[keep] = y[keep]
        return out


@dataclass(frozen=True)
class SiteTable:
    """One site's training rows, as the in-process driver hands them to the site halves."""
    name: str
    features: FloatArray          # (n_samples, F)
    batch: Sequence[object]
    covariates: Covariates


def fit_combat(sites: Sequence[SiteTable], design: Design, options: CombatOptions
               ) -> CombatModel:
    """Fit ComBat across sites by running the site and server halves in-process: the same calls
    the federated study makes through messages. One site holding every row is centralized
    ComBat."""
    if options.ref_batch != design.ref_batch:
        raise HarmonizationError("options.ref_batch and design.ref_batch differ")
    fit = combine_design_moments(
        [site_design_moments(s.features, s.batch, s.covariates, design, options, s.name)
         for s in sites], design, options)
    var_pooled = combine_residual_moments(
        [site_residual_moments(s.features, s.batch, s.covariates, design, fit) for s in sites],
        design)
    held: dict[str, list[BatchMoments]] = {}
    for s in sites:
        z = standardize(s.features, s.batch, s.covariates, design, fit, var_pooled)
        for name, moments in site_batch_moments(z, s.batch, design).items():
            held.setdefault(name, []).append(moments)
    adjustments = {}
    for name, parts in held.items():
        # One holder: the site adjusts its own batch. Several: the server combines first.
        moments = parts[0] if len(parts) == 1 else combine_batch_moments(parts)
        adjustments[name] = estimate_batch_adjustment(moments, options)
    gamma = np.stack([adjustments[b].gamma for b in design.batches])
    delta = np.stack([adjustments[b].delta for b in design.batches])
    return CombatModel(design, options, fit.beta, fit.grand_mean, var_pooled, gamma, delta,
                       fit.batch_counts)


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

    @classmethod
    def of(cls, moments: Sequence[BatchMoments], n_features: int) -> StackedMoments:
        return cls(tuple(m.batch for m in moments), np.array([m.n for m in moments], dtype=int),
                   np.array([m.mean for m in moments]).reshape(len(moments), n_features),
                   np.array([m.m2 for m in moments]).reshape(len(moments), n_features))

    def unstack(self) -> list[BatchMoments]:
        # strict=False: as before, the shortest of the four decides (not checked against each
        # other on receipt).
        return [BatchMoments(b, int(n), mean, m2)
                for b, n, mean, m2 in zip(self.batches, self.n, self.mean, self.m2,
                                          strict=False)]


@dataclass(frozen=True)
class StackedAdjustments:
    """The EB estimates of several batches, (k, F) each."""
    batches: tuple[str, ...]
    gamma: FloatArray
    delta: FloatArray

    @classmethod
    def of(cls, adjustments: Sequence[BatchAdjustment], n_features: int) -> StackedAdjustments:
        return cls(tuple(a.batch for a in adjustments),
                   np.array([a.gamma for a in adjustments]).reshape(len(adjustments), n_features),
                   np.array([a.delta for a in adjustments]).reshape(len(adjustments), n_features))

    def unstack(self) -> dict[str, BatchAdjustment]:
        return {b: BatchAdjustment(b, g, d)
                for b, g, d in zip(self.batches, self.gamma, self.delta, strict=False)}


@dataclass(frozen=True)
class PooledVariance:
    """The server's pooled variance per feature, (F,)."""
    var: FloatArray


def design_to_json(design: Design, options: CombatOptions) -> str:
    return json.dumps({"batches": list(design.batches),
                       "categorical": [[c, list(lv)] for c, lv in design.categorical],
                       "continuous": list(design.continuous), "ref_batch": design.ref_batch,
                       "fit_only": list(design.fit_only),
                       "options": dataclasses_asdict(options)})


def design_from_json(text: str) -> tuple[Design, CombatOptions]:
    data = json.loads(text)
    design = Design(tuple(data["batches"]),
                    tuple((c, tuple(lv)) for c, lv in data["categorical"]),
                    tuple(data["continuous"]), data["ref_batch"],
                    tuple(data.get("fit_only", ())))
    return design, CombatOptions(**data["options"])
