"""Agreement of two measurements of the same cases: the intraclass correlation ICC(3,1) of
Shrout and Fleiss (1979), two-way mixed effects, consistency, single measurement. How radiomics
studies judge a feature's robustness to the segmentation (a feature computed from an automatic
and from a hand-drawn mask of each case); 0.75 is the usual bar of good reliability (Koo and
Li, 2016)."""

from __future__ import annotations

import numpy as np

#: The ICC at and above which a feature counts as reliable.
GOOD_ICC = 0.75


def icc_3_1(ratings: np.ndarray) -> np.ndarray:
    """ICC(3,1) per feature of ``ratings`` (n_cases, n_raters[, n_features]):
    ``(MS_rows - MS_error) / (MS_rows + (k - 1) MS_error)`` from the two-way ANOVA without
    replication. NaN for a feature that is constant over every case and rater; a case with a
    NaN rating is left out of that feature's ANOVA."""
    x = np.asarray(ratings, dtype=float)
    squeeze = x.ndim == 2
    if squeeze:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[1] < 2:
        raise ValueError(f"ratings must be (cases, raters >= 2[, features]), got {x.shape}")
    out = np.full(x.shape[2], np.nan)
    for f in range(x.shape[2]):
        values = x[:, :, f]
        values = values[np.all(np.isfinite(values), axis=1)]
        n, k = values.shape
        if n < 2:
            continue
        grand = values.mean()
        ss_rows = k * ((values.mean(axis=1) - grand) ** 2).sum()
        ss_cols = n * ((values.mean(axis=0) - grand) ** 2).sum()
        ss_error = ((values - grand) ** 2).sum() - ss_rows - ss_cols
        ms_rows = ss_rows / (n - 1)
        ms_error = ss_error / ((n - 1) * (k - 1))
        denominator = ms_rows + (k - 1) * ms_error
        if denominator > 0:
            out[f] = (ms_rows - ms_error) / denominator
    return out[0] if squeeze else out
