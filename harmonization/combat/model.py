"""The fitted ComBat model, applied at each site to its own rows, and the in-process driver
that fits it by running the site and server halves (:func:`fit_combat`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from common.errors import HarmonizationError
from harmonization.combat.design import (
    CombatOptions,
    Covariates,
    Design,
    FloatArray,
    IntArray,
    checked_features,
)
from harmonization.combat.eb import estimate_batch_adjustment
from harmonization.combat.moments import (
    BatchMoments,
    combine_batch_moments,
    combine_design_moments,
    combine_residual_moments,
    site_batch_moments,
    site_design_moments,
    site_residual_moments,
    standardize,
)


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
        y = checked_features(y, "transform")
        adjusted, scale, location = self.adjusted(y, batch, covariates)
        out = adjusted * scale + location
        if self.design.ref_index is not None:
            keep = self.design.batch_index(batch) == self.design.ref_index
            out[keep] = y[keep]
        return out

    def fitted_batches(self) -> set[str]:
        """The batches whose rows it can harmonize (a site's model lacks the adjustments of
        other sites' own batches)."""
        return {b for b, g in zip(self.design.batches, self.gamma, strict=True)
                if np.all(np.isfinite(g))}

    def adjusted(self, y: npt.ArrayLike, batch: Sequence[object], covariates: Covariates
                 ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """The rows on ComBat's standardized scale with their batch's effects removed, and what
        :meth:`transform` maps them back with: ``adjusted * scale + location`` (the pooled SD;
        the grand mean and the applied covariates' effects). CovBat works on ``adjusted``."""
        y = checked_features(y, "transform")
        if y.shape[1] != self.grand_mean.shape[0]:
            raise HarmonizationError(f"rows have {y.shape[1]} features, the model "
                                     f"{self.grand_mean.shape[0]}")
        design = self.design
        effect = (design.applied_matrix(batch, covariates)
                  @ self.beta[design.n_batch:][design.applied()])
        index = design.batch_index(batch)
        scale = np.sqrt(self.var_pooled)
        s = (y - self.grand_mean - effect) / scale
        return (s - self.gamma[index]) / np.sqrt(self.delta[index]), scale, \
            self.grand_mean + effect


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
