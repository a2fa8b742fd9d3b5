"""Scanner-robust screening: the federated comparison equals a pooled least-squares fit, and it
finds the features whose outcome effect differs between scanners."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from common.errors import HarmonizationError
from harmonization.combat.design import Design
from harmonization.screening import scanner_shares, site_interaction_moments

BATCHES = ("s1", "s2", "s3")


def _cohort(seed: int = 0, n: int = 150):
    rng = np.random.default_rng(seed)
    batch = rng.choice(BATCHES, n)
    label = (rng.random(n) < 0.4).astype(float)
    age = rng.normal(65, 9, n)
    index = np.searchsorted(BATCHES, batch)
    shift = np.array([0.0, 2.0, -1.0])[index]
    stable = shift + 1.5 * label + 0.05 * age + rng.normal(0, 1, n)       # one label effect
    gain = np.array([1.5, 0.0, -1.0])[index]
    unstable = shift + gain * label + 0.05 * age + rng.normal(0, 1, n)    # per-scanner effect
    noise = rng.normal(0, 1, n)
    return np.column_stack([stable, unstable, noise]), batch, label, age


def _pooled(y, batch, label, age):
    """The same comparison, written out: two explicit designs and lstsq."""
    index = np.searchsorted(BATCHES, batch)
    ind = np.eye(len(BATCHES))[index]
    full = np.column_stack([ind, ind * label[:, None], age])
    reduced = np.column_stack([ind, label, age])
    rss = []
    for x in (reduced, full):
        beta = np.linalg.lstsq(x, y, rcond=None)[0]
        rss.append(((y - x @ beta) ** 2).sum(axis=0))
    df1, df2 = len(BATCHES) - 1, len(y) - full.shape[1]
    f = (rss[0] - rss[1]) / df1 / (rss[1] / df2)
    return (rss[0] - rss[1]) / rss[0], stats.f.sf(f, df1, df2)


def _federated(y, batch, label, age, sites=3):
    design = Design(BATCHES, (("label", ("0", "1")),), ("age",), fit_only=("label",))
    parts = []
    for rows in np.array_split(np.arange(len(y)), sites):
        parts.append(site_interaction_moments(y[rows], batch[rows].tolist(), label[rows],
                                              {"age": age[rows].tolist()}, design))
    return scanner_shares(parts, design)


def test_federated_equals_pooled_least_squares():
    y, batch, label, age = _cohort()
    shares = _federated(y, batch, label, age)
    share, p = _pooled(y, batch, label, age)
    np.testing.assert_allclose(shares.share, share, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(shares.p, p, rtol=1e-7, atol=1e-12)
    assert shares.df == (2, len(y) - 7)


def test_finds_the_feature_whose_label_effect_differs_by_scanner():
    shares = _federated(*_cohort(seed=3))
    stable, unstable, _ = shares.p
    assert unstable < 1e-6 < 0.05 < stable
    assert shares.share[1] > 5 * shares.share[0]


def test_a_one_class_scanner_has_no_label_effect_of_its_own():
    y, batch, label, age = _cohort(seed=1)
    label[batch == "s3"] = 0.0  # no positive on s3: its interaction column is empty
    shares = _federated(y, batch, label, age)
    assert shares.df == (1, len(y) - 6)
    assert np.all(np.isfinite(shares.share)) and np.all((shares.p >= 0) & (shares.p <= 1))


def test_bad_input_is_named():
    y, batch, label, age = _cohort()
    design = Design(BATCHES, (("label", ("0", "1")),), ("age",), fit_only=("label",))
    label[3] = np.nan
    with pytest.raises(HarmonizationError, match="labels must be finite"):
        site_interaction_moments(y, batch.tolist(), label, {"age": age.tolist()}, design)
    with pytest.raises(HarmonizationError, match="no site"):
        scanner_shares([], design)
