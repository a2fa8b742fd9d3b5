"""Does a table still show its batches? Per-feature site-effect tests before and after ComBat."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class SiteEffect:
    """Kruskal-Wallis test of each feature across batches."""

    pvalues: np.ndarray  # (F,), NaN where a feature is constant
    alpha: float

    @property
    def share_significant(self) -> float:
        """Share of the testable features with p < alpha."""
        tested = self.pvalues[np.isfinite(self.pvalues)]
        return float(np.mean(tested < self.alpha)) if tested.size else 0.0


def site_effect(features: np.ndarray, batch: Sequence[object], alpha: float = 0.05
                ) -> SiteEffect:
    """Kruskal-Wallis p-value of every feature (column of ``features``, (n_samples, F)) across
    the batches. Batches differ in case mix too: test residuals of the preserved covariates to
    separate the two (``myelofed harmonize`` does)."""
    labels = np.asarray([str(b) for b in batch])
    groups = [labels == b for b in np.unique(labels)]
    pvalues = np.full(features.shape[1], np.nan)
    if len(groups) < 2:
        return SiteEffect(pvalues, alpha)
    for j in range(features.shape[1]):
        column = features[:, j]
        if np.ptp(column) > 0:
            pvalues[j] = stats.kruskal(*[column[g] for g in groups]).pvalue
    return SiteEffect(pvalues, alpha)
