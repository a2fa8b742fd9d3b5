"""Does a table still show its batches? Per-feature site-effect tests before and after ComBat."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
import numpy.typing as npt
from scipy import stats

matplotlib.use("Agg")  # no display: figures are drawn to PNG bytes
import matplotlib.pyplot as plt  # noqa: E402


@dataclass(frozen=True)
class SiteEffect:
    """Kruskal-Wallis test of each feature across batches."""

    pvalues: npt.NDArray[np.float64]  # (F,), NaN where a feature is constant
    alpha: float

    @property
    def share_significant(self) -> float:
        """Share of the testable features with p < alpha."""
        tested = self.pvalues[np.isfinite(self.pvalues)]
        return float(np.mean(tested < self.alpha)) if tested.size else 0.0

    @property
    def tested(self) -> int:
        """How many features could be tested (not constant)."""
        return int(np.isfinite(self.pvalues).sum())

    @property
    def significant(self) -> int:
        """How many features have p < alpha."""
        return int((self.pvalues[np.isfinite(self.pvalues)] < self.alpha).sum())


def site_effect(features: npt.NDArray[np.float64], batch: Sequence[object], alpha: float = 0.05
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


def scanner_effect(features: npt.NDArray[np.float64], batch: Sequence[object],
                   label: npt.NDArray[np.generic] | None = None, alpha: float = 0.05
                   ) -> SiteEffect:
    """The site reports' diagnostic: :func:`site_effect` of each feature less its class's mean
    (``label``: a classification's classes, None for none), so that the scanners' case mix does
    not count as a scanner effect."""
    residual = np.array(features, dtype=np.float64, copy=True)
    if label is not None:
        for value in np.unique(label):
            residual[label == value] -= residual[label == value].mean(axis=0)
    return site_effect(residual, batch, alpha)


def site_effect_png(before: npt.NDArray[np.float64], after: npt.NDArray[np.float64],
                    batch: Sequence[object], names: Sequence[str], effect: SiteEffect,
                    top: int = 6) -> bytes:
    """A picture of the ``top`` features with the strongest site effect before harmonization:
    their distribution per batch before (upper row) and after (lower row), as PNG bytes."""
    order = np.argsort(np.where(np.isfinite(effect.pvalues), effect.pvalues, np.inf))[:top]
    labels = np.asarray([str(b) for b in batch])
    levels = list(np.unique(labels))
    fig, axes = plt.subplots(2, len(order), figsize=(2.6 * len(order), 5.2), squeeze=False,
                             sharex=True)
    for col, j in enumerate(order):
        for row, (values, when) in enumerate(((before, "before"), (after, "after"))):
            ax = axes[row, col]
            ax.boxplot([values[labels == b, j] for b in levels], showfliers=False)
            ax.set_xticks(range(1, len(levels) + 1), levels, rotation=60, fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
            name = str(names[j])
            title = name if len(name) <= 28 else name[:26] + "..."
            ax.set_title(f"{title}\n{when}", fontsize=7)
    fig.suptitle("Feature distributions per batch, less the preserved covariates' effects",
                 fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
