from __future__ import annotations

import numpy as np

from harmonization.diagnostics import scanner_effect, site_effect


def test_the_scanner_diagnostic_does_not_count_case_mix_as_a_scanner_effect():
    """Scanner s2 sees mostly myeloma: a feature that tracks only the diagnosis differs between
    the scanners, but not once each class's mean is taken off; a feature the scanner shifts
    differs either way; a constant feature is not tested."""
    rng = np.random.default_rng(3)
    batch = np.repeat(["s1", "s2"], 60)
    label = np.r_[rng.random(60) < 0.2, rng.random(60) < 0.8].astype(int)
    x = np.column_stack([
        rng.normal(0, 1, 120) + 3.0 * label,                    # the diagnosis only
        rng.normal(0, 1, 120) + 2.0 * (batch == "s2"),          # the scanner
        np.full(120, 7.0)])                                     # constant
    raw = site_effect(x, batch)
    assert raw.pvalues[0] < 0.05 and raw.pvalues[1] < 0.05 and np.isnan(raw.pvalues[2])
    effect = scanner_effect(x, batch, label)
    assert effect.pvalues[0] > 0.05 and effect.pvalues[1] < 0.05
    assert (effect.tested, effect.significant, effect.share_significant) == (2, 1, 0.5)
    # no label (a regression): the same as the plain test
    np.testing.assert_array_equal(scanner_effect(x, batch).pvalues, raw.pvalues)
