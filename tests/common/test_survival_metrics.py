"""A Cox model's metrics at a site (common/metrics/survival.py): equal to independent references
on the same predictions (lifelines' Harrell C, the plain AUC and Brier score where nothing is
censored before the time, Breslow's baseline by hand), and nothing reported over fewer than the
minimum count."""

from __future__ import annotations

import numpy as np
import pytest
from lifelines.utils import concordance_index
from sklearn.metrics import roc_auc_score

from common.metrics.survival import (
    baseline_survival,
    checked_times,
    kaplan_meier_on_grid,
    predicted_survival,
    risk_groups,
    survival_table,
)


def _rows(n: int, seed: int, censor: tuple[float, float] = (12.0, 84.0)
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    event_time = rng.exponential(30.0 * np.exp(-0.8 * x))
    censored = rng.uniform(*censor, n)
    return (np.minimum(event_time, censored), (event_time <= censored).astype(float), 0.8 * x)


def test_harrells_c_is_lifelines_and_unos_is_harrells_without_censoring():
    train, test = _rows(120, 1), _rows(60, 2)
    table = survival_table(*test, train, bootstrap=0)
    time, event, score = test
    # lifelines ranks by predicted survival time: a higher hazard is a shorter time
    assert table["c_harrell"] == pytest.approx(concordance_index(time, -score, event), abs=1e-12)
    assert np.isnan(table["c_harrell_low"])  # no bootstrap asked for

    uncensored = [(t, np.ones_like(e), s) for t, e, s in (_rows(120, 3, (1e6, 2e6)),
                                                           _rows(60, 4, (1e6, 2e6)))]
    table = survival_table(*uncensored[1], uncensored[0], times=(1e9,), bootstrap=0)
    assert table["c_uno"] == pytest.approx(table["c_harrell"], abs=1e-12)


def test_auc_and_brier_at_a_time_before_any_censoring_are_the_plain_ones():
    train, test = _rows(150, 5, (40.0, 84.0)), _rows(80, 6, (40.0, 84.0))
    times = (12.0, 24.0, 36.0)
    table = survival_table(*test, train, times=times, bootstrap=0)
    time, event, score = test
    survival = predicted_survival(checked_times(*train, "train"), score, times)
    for i, t in enumerate(times):
        case, control = (time <= t) & (event == 1), time > t
        labels = np.r_[np.ones(case.sum()), np.zeros(control.sum())]
        auc = roc_auc_score(labels, np.r_[score[case], score[control]])
        assert table["auc_at"][i] == [t, pytest.approx(auc, abs=1e-12)]
        brier = np.mean(((time > t).astype(float) - survival[:, i]) ** 2)
        assert table["brier_at"][i] == [t, pytest.approx(brier, abs=1e-12)]
    assert 0 < table["integrated_brier"] < 0.25


def test_the_predicted_survival_takes_breslows_baseline_of_the_training_rows():
    time, event, score = _rows(50, 7)
    order = np.argsort(time)
    at = 20.0
    hazard = sum(1.0 / np.exp(score[time >= time[i]]).sum() for i in order
                 if event[i] and time[i] <= at)
    expected = np.exp(-hazard * np.exp(score[:3]))
    got = predicted_survival(checked_times(time, event, score, "train"), score[:3], [at])[:, 0]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # the baseline a site keeps for its nomogram: the survival at a linear predictor of 0
    assert baseline_survival(time, event, score, [at])[0] == pytest.approx(np.exp(-hazard))
    assert baseline_survival(time, np.zeros_like(event), score, [at]) is None


def test_nothing_reported_is_over_fewer_than_the_minimum_count():
    train, test = _rows(120, 8), _rows(40, 9)
    table = survival_table(*test, train, min_count=8, bootstrap=50, seed=3)
    time = test[0]
    for name, curve in table["kaplan_meier"].items():
        assert len(curve["survival"]) == len(curve["at_risk"]) == len(table["grid"])
        for value, at_risk in zip(curve["survival"], curve["at_risk"], strict=True):
            assert (at_risk is None) == np.isnan(value), name
            assert at_risk is None or at_risk >= 8
    assert all(row[2] >= 8 for row in table["calibration_at"])
    assert {row[1] for row in table["calibration_at"]} == {"low", "intermediate", "high"}
    assert table["c_harrell_low"] <= table["c_harrell"] <= table["c_harrell_high"]
    # under the minimum: no group, no curve
    small = survival_table(time[:7], test[1][:7], test[2][:7], train, min_count=8, bootstrap=0)
    assert small["kaplan_meier"] == {} and small["calibration_at"] == []
    assert [g.tolist() for g in risk_groups(np.arange(17.0), 8)] == [list(range(9)),
                                                                 list(range(9, 17))]
    values, at_risk = kaplan_meier_on_grid(np.array([1.0, 2, 3, 4, 5]), np.ones(5, bool),
                                           [0.0, 2.5, 4.5], 2)
    assert values[:2] == pytest.approx([1.0, 0.6]) and np.isnan(values[2])
    assert at_risk == [5, 3, None]


def test_bad_rows_are_named():
    train = _rows(30, 10)
    with pytest.raises(ValueError, match="test rows: follow-up times must be finite"):
        survival_table([1.0, -2.0], [1, 0], [0.1, 0.2], train)
    with pytest.raises(ValueError, match="test rows: events must be 0"):
        survival_table([1.0, 2.0], [1, 2], [0.1, 0.2], train)
    with pytest.raises(ValueError, match="training rows: 3 times, 2 events"):
        survival_table([1.0, 2.0], [1, 0], [0.1, 0.2], ([1.0, 2, 3], [1, 0], [0.1, 0.2, 0.3]))
    # no event at all: the discrimination is undefined, not an error
    table = survival_table([5.0, 9.0, 12.0], [0, 0, 0], [0.1, 0.2, 0.3], train, bootstrap=10)
    assert np.isnan(table["c_harrell"]) and np.isnan(table["mean_auc"])
