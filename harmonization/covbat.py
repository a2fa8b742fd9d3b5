"""CovBat (Chen et al., Human Brain Mapping 2022): ComBat, then the scanners' effects on the
features' *covariance*, split where the data lives.

ComBat equalizes each feature's mean and variance per scanner; features can still covary
differently on different scanners (a sharper reconstruction couples texture features that a
softer one leaves apart). CovBat takes ComBat's residuals (each row on ComBat's standardized
scale with its scanner's effects removed, :meth:`CombatModel.adjusted`), finds their principal
components, and harmonizes the scores of the leading components (those that explain
``pct_var`` of the variance, or ``n_pc`` of them) with a location-scale ComBat without
empirical Bayes, as the authors' code does; the rows are then mapped back.

Federated, in two more rounds after ComBat:

1. each site sends the count, sum and sum of outer products of its training rows' residuals
   (:func:`site_residual_products`, indexed by feature x feature); the server pools them into
   the mean and covariance and takes the leading eigenvectors (:func:`principal_axes`);
2. each site projects its residuals onto them and the scores go through federated ComBat's own
   rounds (:func:`harmonization.combat.model.fit_combat`'s halves), with the scanners and the
   design's estimation-only covariates (the outcome, when it is protected: a referral pathway's
   label difference between scanners stays).

:func:`fit_covbat` drives the halves in-process, as the study does through messages; one site
holding every row is centralized CovBat. Arrays are samples x features, float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from common.errors import HarmonizationError
from harmonization.combat.design import CombatOptions, Covariates, Design, FloatArray
from harmonization.combat.model import CombatModel, SiteTable, fit_combat


@dataclass(frozen=True)
class ResidualProducts:
    """What a site sends in CovBat's first round: over its training rows, the count, the sum
    of the residuals (F,) and the sum of their outer products (F, F)."""
    n: int
    total: FloatArray
    products: FloatArray

    #: What may leave a site (:func:`common.records.check_sent`).
    AXES: ClassVar = {"total": ("features",), "products": ("features", "features")}
    COUNTS: ClassVar = {"n": "min_cell"}


def site_residual_products(residuals: npt.ArrayLike) -> ResidualProducts:
    """A site's sums of its training rows' ComBat residuals."""
    r = np.asarray(residuals, dtype=np.float64)
    if r.ndim != 2 or not np.all(np.isfinite(r)):
        raise HarmonizationError("CovBat: the residuals must be a finite (rows, features) array")
    return ResidualProducts(int(r.shape[0]), r.sum(axis=0), r.T @ r)


@dataclass(frozen=True)
class PrincipalAxes:
    """The pooled residuals' mean (F,), the leading eigenvectors (F, k) and every eigenvalue."""
    mean: FloatArray
    components: FloatArray
    eigenvalues: FloatArray

    @property
    def explained(self) -> float:
        """The share of the residual variance the kept components explain."""
        total = float(self.eigenvalues.sum())
        return float(self.eigenvalues[: self.components.shape[1]].sum() / total) if total else 0.0


def principal_axes(parts: Sequence[ResidualProducts], pct_var: float = 0.95, n_pc: int = 0
                   ) -> PrincipalAxes:
    """The principal components of the pooled residuals: the fewest that explain more than
    ``pct_var`` of their variance, or ``n_pc`` when it is above 0. Each eigenvector's sign is
    fixed (its largest entry positive), so every run finds the same axes."""
    if not parts:
        raise HarmonizationError("CovBat: no site sent its residual sums")
    n = sum(p.n for p in parts)
    if n < 2:
        raise HarmonizationError("CovBat needs two training rows or more")
    mean = np.sum([p.total for p in parts], axis=0) / n
    covariance = (np.sum([p.products for p in parts], axis=0) - n * np.outer(mean, mean)) / (n - 1)
    values, vectors = np.linalg.eigh((covariance + covariance.T) / 2)
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    vectors *= np.where(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(len(values))] < 0,
                        -1.0, 1.0)
    if n_pc > 0:
        k = min(n_pc, len(values))
    else:
        ratio = np.cumsum(values) / values.sum() if values.sum() > 0 else np.ones(len(values))
        k = int(np.argmax(ratio > pct_var)) + 1
    return PrincipalAxes(mean, vectors[:, :k], values)


def score_design(design: Design) -> Design:
    """The design the scores are harmonized under: the scanners, and the estimation-only
    covariates (the outcome) still protected; the applied covariates' effects are already
    out of the residuals."""
    kept = set(design.fit_only)
    return Design(design.batches, tuple((c, lv) for c, lv in design.categorical if c in kept),
                  tuple(c for c in design.continuous if c in kept), design.ref_batch,
                  design.fit_only)


def score_options(options: CombatOptions) -> CombatOptions:
    """The options the scores are harmonized with: location and scale without empirical Bayes,
    as the authors' code does, and the features' privacy guards."""
    return CombatOptions(eb=False, ref_batch=options.ref_batch,
                         min_batch_size=options.min_batch_size, min_cell=options.min_cell)


def covbat_scores(combat: CombatModel, axes: PrincipalAxes, y: npt.ArrayLike,
                  batch: Sequence[object], covariates: Covariates) -> FloatArray:
    """The scores of rows' ComBat residuals along the axes: what CovBat harmonizes."""
    features = combat.grand_mean.shape[0]
    if axes.mean.shape != (features,) or axes.components.ndim != 2 or not (
            axes.components.shape[0] == features and 1 <= axes.components.shape[1] <= features):
        raise HarmonizationError(f"CovBat: axes of shape {axes.components.shape} and a mean of "
                                 f"shape {axes.mean.shape} do not fit {features} features")
    residuals, _, _ = combat.adjusted(y, batch, covariates)
    scores: FloatArray = (residuals - axes.mean) @ axes.components
    return scores


@dataclass(frozen=True)
class CovbatModel:
    """Fitted CovBat: apply it to training or held-out rows of the fitted scanners."""
    combat: CombatModel
    axes: PrincipalAxes
    scores: CombatModel

    def transform(self, y: npt.ArrayLike, batch: Sequence[object], covariates: Covariates
                  ) -> FloatArray:
        """Harmonize rows: ComBat, then their leading scores' scanner effects removed."""
        residuals, scale, location = self.combat.adjusted(y, batch, covariates)
        scores = covbat_scores(self.combat, self.axes, y, batch, covariates)
        harmonized = self.scores.transform(scores, batch, covariates)
        out: FloatArray = (residuals + (harmonized - scores) @ self.axes.components.T
                           ) * scale + location
        return out

    def fitted_batches(self) -> set[str]:
        """The scanners whose rows it can harmonize."""
        return self.combat.fitted_batches() & self.scores.fitted_batches()


def fit_covbat(sites: Sequence[SiteTable], design: Design, options: CombatOptions,
               pct_var: float = 0.95, n_pc: int = 0) -> CovbatModel:
    """Fit CovBat across sites by running the site and server halves in-process (see the
    module docstring). The scores' ComBat has no empirical Bayes step, as the authors'."""
    combat = fit_combat(sites, design, options)
    residuals = [combat.adjusted(s.features, s.batch, s.covariates)[0] for s in sites]
    axes = principal_axes([site_residual_products(r) for r in residuals], pct_var, n_pc)
    scores = [SiteTable(s.name, covbat_scores(combat, axes, s.features, s.batch, s.covariates),
                        s.batch, s.covariates) for s in sites]
    return CovbatModel(combat, axes, fit_combat(scores, score_design(design),
                                                score_options(options)))
