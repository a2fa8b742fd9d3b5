"""The validation metrics against scikit-learn, SciPy, definitions and published examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    brier_score_loss,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from common.metrics.calibration import brier_score, calibration, calibration_curve, decision_curve
from common.metrics.discrimination import auc_bootstrap_ci, auc_delong, delong_test
from common.metrics.pooling import pool_random_effects
from common.metrics.regression import bland_altman, pearson, spearman
from common.metrics.threshold import at_threshold, youden_threshold


def scores(seed: int, n: int = 80, ties: bool = False) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(float)
    a = y * 1.0 + rng.normal(0, 1, n)
    b = 0.6 * a + y * 0.3 + rng.normal(0, 0.8, n)  # a second model, correlated with the first
    if ties:
        a, b = np.round(a, 0), np.round(b, 0)
    return y, a, b


def delong_by_definition(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) directly: psi over all pairs, the placement values V10, V01 and
    their sample covariances; for one or more scores (rows of ``s``)."""
    s = np.atleast_2d(s)
    pos, neg = s[:, y == 1], s[:, y == 0]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    m, n = v10.shape[1], v01.shape[1]
    return psi.mean(axis=(1, 2)), np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n


@pytest.mark.parametrize("ties", [False, True])
def test_auc_and_delong_variance_match_sklearn_and_the_definition(ties: bool):
    y, a, _ = scores(1, ties=ties)
    result = auc_delong(y, a)
    auc, cov = delong_by_definition(y, a)
    assert result.auc == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert result.variance == pytest.approx(cov[0, 0], rel=1e-10)
    half = 1.959964 * math.sqrt(result.variance)
    assert (result.low, result.high) == pytest.approx((auc[0] - half, auc[0] + half), abs=1e-6)
    assert (result.n_positive, result.n_negative) == (int(y.sum()), int((1 - y).sum()))


def test_hanley_mcneil_rating_example():
    """Hanley & McNeil (Radiology 1982), 109 CT scans rated 1-5: AUC 0.893 (their Table 1)."""
    normal, abnormal = [33, 6, 6, 11, 2], [3, 2, 2, 11, 33]
    y = np.r_[np.zeros(sum(normal)), np.ones(sum(abnormal))]
    s = np.r_[np.repeat(np.arange(1, 6), normal), np.repeat(np.arange(1, 6), abnormal)]
    result = auc_delong(y, s)
    assert result.auc == pytest.approx(0.893, abs=5e-4)
    # their SE of 0.032 comes from an exponential approximation; DeLong's is close to it
    assert math.sqrt(result.variance) == pytest.approx(0.032, abs=0.002)


def test_delong_paired_test_matches_the_definition():
    y, a, b = scores(2, n=120)
    test = delong_test(y, a, b)
    aucs, cov = delong_by_definition(y, np.vstack([a, b]))
    z = (aucs[0] - aucs[1]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert (test.auc_a, test.auc_b) == pytest.approx(tuple(aucs), abs=1e-12)
    assert test.z == pytest.approx(z, rel=1e-9)
    assert test.p_value == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-9)
    assert delong_test(y, b, a).z == pytest.approx(-test.z)
    same = delong_test(y, a, 2 * a + 1)  # same ranking: no difference, p = 1
    assert same.difference == 0 and same.p_value == 1.0


def test_bootstrap_ci_brackets_the_auc_and_agrees_with_delong():
    y, a, _ = scores(3, n=200)
    low, high = auc_bootstrap_ci(y, a, n_boot=1000, seed=1)
    delong = auc_delong(y, a)
    assert low < delong.auc < high
    assert low == pytest.approx(delong.low, abs=0.03) and high == pytest.approx(delong.high,
                                                                                abs=0.03)
    # stratified: every resample keeps both classes, so a tiny test set still gives a CI
    tiny_low, tiny_high = auc_bootstrap_ci(np.array([0, 0, 1, 1.0]), np.array([1, 2, 3, 4.0]))
    assert tiny_low == tiny_high == 1.0
    assert auc_bootstrap_ci(y, a, n_boot=200, seed=5) == auc_bootstrap_ci(y, a, n_boot=200,
                                                                          seed=5)


def test_youden_threshold_and_metrics_at_it_match_sklearn():
    y, a, _ = scores(4, n=150)
    fpr, tpr, cuts = roc_curve(y, a)
    j = tpr - fpr
    assert youden_threshold(y, a) == pytest.approx(cuts[np.flatnonzero(j == j.max())[0]])
    threshold = youden_threshold(y, a)
    m = at_threshold(y, a, threshold)
    predicted = (a >= threshold).astype(float)
    tn, fp, fn, tp = confusion_matrix(y, predicted).ravel()
    assert (m.tp, m.fp, m.tn, m.fn) == (tp, fp, tn, fn)
    assert m.sensitivity == pytest.approx(tp / (tp + fn))
    assert m.specificity == pytest.approx(tn / (tn + fp))
    assert m.ppv == pytest.approx(tp / (tp + fp)) and m.npv == pytest.approx(tn / (tn + fn))
    assert m.f1 == pytest.approx(f1_score(y, predicted))
    assert m.accuracy == pytest.approx(np.mean(predicted == y))
    none = at_threshold(y, a, a.max() + 1)  # nobody called positive: PPV undefined, not 0
    assert none.tp == 0 and math.isnan(none.ppv) and none.specificity == 1.0


def test_brier_and_calibration_against_sklearn_and_direct_likelihood():
    rng = np.random.default_rng(5)
    lp = rng.normal(0, 1.5, 300)
    y = (rng.random(300) < 1 / (1 + np.exp(-(0.4 + 0.7 * lp)))).astype(float)
    risk = 1 / (1 + np.exp(-lp))  # over-confident (true slope 0.7) and too low (intercept 0.4)
    assert brier_score(y, risk) == pytest.approx(brier_score_loss(y, risk))
    result = calibration(y, risk)
    slope = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(lp[:, None], y)
    assert result.slope == pytest.approx(slope.coef_[0, 0], abs=1e-5)

    def nll(a: np.ndarray) -> float:  # intercept with the linear predictor as an offset
        eta = a[0] + lp
        return float(np.sum(np.logaddexp(0, eta) - y * eta))

    intercept = optimize.minimize(nll, [0.0], tol=1e-12).x[0]
    assert result.intercept == pytest.approx(intercept, abs=1e-5)
    assert 0.5 < result.slope < 0.9 and result.intercept > 0.1
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        calibration(y, np.clip(risk, 0, 1).round())


def test_calibration_curve_bins_never_hold_fewer_than_the_minimum():
    rng = np.random.default_rng(6)
    risk = rng.uniform(0.01, 0.99, 37)
    y = (rng.random(37) < risk).astype(float)
    bins = calibration_curve(y, risk, n_bins=10, min_count=5)
    assert len(bins) == 7 and min(b.n for b in bins) >= 5 and sum(b.n for b in bins) == 37
    order = np.argsort(risk, kind="stable")
    first = order[: bins[0].n]
    assert bins[0].mean_risk == pytest.approx(risk[first].mean())
    assert bins[0].observed == pytest.approx(y[first].mean())
    assert [b.mean_risk for b in bins] == sorted(b.mean_risk for b in bins)
    assert calibration_curve(y[:4], risk[:4], min_count=5) == []


def test_decision_curve_net_benefit_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0.0])
    risk = np.array([0.9, 0.6, 0.2, 0.7, 0.3, 0.1, 0.1, 0.05, 0.05, 0.05])
    point = decision_curve(y, risk, [0.25])[0]
    # treated: risk >= 0.25 -> 0.9, 0.6 (TP) and 0.7, 0.3 (FP); odds 1/3
    assert point.model == pytest.approx(2 / 10 - 2 / 10 / 3)
    assert point.treat_all == pytest.approx(0.3 - 0.7 / 3)
    with pytest.raises(ValueError, match="threshold 1.0"):
        decision_curve(y, risk, [1.0])


def test_decision_curve_never_tells_apart_fewer_patients_than_the_minimum():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 23).astype(float)
    risk = rng.uniform(0, 1, 23)
    thresholds = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))
    full = decision_curve(y, risk, thresholds)
    assert all(np.isfinite(p.model) for p in full)  # min_count 1: every threshold
    for min_count in (2, 5, 8):
        curve = decision_curve(y, risk, thresholds, min_count)
        # the length is the protocol's, whatever the data: withheld points are NaN
        assert [p.threshold for p in curve] == list(thresholds)
        kept = [p.threshold for p in curve if np.isfinite(p.model)]
        assert kept, "some thresholds qualify on 23 patients"
        edges = [-np.inf, *kept, np.inf]
        groups = [np.sum((risk >= lo) & (risk < hi))
                  for lo, hi in zip(edges, edges[1:], strict=False)]
        assert all(g == 0 or g >= min_count for g in groups), (min_count, kept, groups)
        # the points kept are the full curve's, and treating all is always there
        for point, whole in zip(curve, full, strict=True):
            assert point.treat_all == whole.treat_all
            assert np.isnan(point.model) or point.model == whole.model
    # a handful of patients (fewer than twice the minimum) tells no two groups apart
    for point in decision_curve(y[:7], risk[:7], thresholds, 5):
        if np.isfinite(point.model):
            assert np.all(risk[:7] >= point.threshold) or np.all(risk[:7] < point.threshold)


def test_regression_agreement_matches_scipy():
    rng = np.random.default_rng(7)
    truth = rng.uniform(5, 80, 60)
    prediction = truth * 0.8 + 6 + rng.normal(0, 8, 60)
    r = pearson(truth, prediction)
    assert r.r == pytest.approx(stats.pearsonr(truth, prediction).statistic)
    z, se = math.atanh(r.r), 1 / math.sqrt(57)
    assert (r.low, r.high) == pytest.approx((math.tanh(z - 1.959964 * se),
                                             math.tanh(z + 1.959964 * se)), abs=1e-6)
    rho = spearman(truth, prediction)
    assert rho.r == pytest.approx(stats.spearmanr(truth, prediction).statistic)
    assert rho.low < rho.r < rho.high
    agreement = bland_altman(truth, prediction)
    d = prediction - truth
    assert agreement.bias == pytest.approx(d.mean())
    assert agreement.upper - agreement.lower == pytest.approx(2 * 1.959964 * d.std(ddof=1),
                                                              rel=1e-6)
    with pytest.raises(ValueError, match="at least 4 rows"):
        pearson(truth[:3], prediction[:3])


def test_random_effects_pooling_reproduces_the_bcg_meta_analysis():
    """The BCG vaccine trials (Colditz et al. 1994; metafor's dat.bcg), log risk ratios pooled by
    DerSimonian-Laird: metafor reports -0.7141 [-1.0644, -0.3638], tau^2 0.3088, Q 152.2330,
    I^2 92.12 %."""
    trials = np.array([[4, 119, 11, 128], [6, 300, 29, 274], [3, 228, 11, 209],
                       [62, 13536, 248, 12619], [33, 5036, 47, 5761], [180, 1361, 372, 1079],
                       [8, 2537, 10, 619], [505, 87886, 499, 87892], [29, 7470, 45, 7232],
                       [17, 1699, 65, 1600], [186, 50448, 141, 27197], [5, 2493, 3, 2338],
                       [27, 16886, 29, 17825]], float)
    tpos, tneg, cpos, cneg = trials.T
    yi = np.log(tpos / (tpos + tneg) / (cpos / (cpos + cneg)))
    vi = 1 / tpos - 1 / (tpos + tneg) + 1 / cpos - 1 / (cpos + cneg)
    pooled = pool_random_effects(yi, vi)
    assert pooled.estimate == pytest.approx(-0.7141, abs=1e-4)
    assert (pooled.low, pooled.high) == pytest.approx((-1.0644, -0.3638), abs=1e-4)
    assert pooled.tau2 == pytest.approx(0.3088, abs=1e-4)
    assert pooled.q == pytest.approx(152.2330, abs=1e-3)
    assert pooled.i2 == pytest.approx(0.9212, abs=1e-4)
    homogeneous = pool_random_effects([0.8, 0.8, 0.8], [0.01, 0.02, 0.01])
    assert homogeneous.i2 == 0 and homogeneous.tau2 == 0 and homogeneous.estimate == 0.8


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="needs both classes"):
        auc_delong(np.ones(5), np.arange(5.0))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        auc_delong(np.array([0, 2, 1.0]), np.arange(3.0))
    with pytest.raises(ValueError, match="3 labels for 2 scores"):
        brier_score(np.array([0, 1, 1.0]), np.array([0.2, 0.3]))
    with pytest.raises(ValueError, match="missing or infinite"):
        auc_delong(np.array([0, 1.0]), np.array([0.2, np.nan]))
    with pytest.raises(ValueError, match="two or more estimates"):
        pool_random_effects([0.8], [0.01])


@pytest.mark.parametrize("n, positives", [(40, 15), (40, 0), (3, 1)],
                         ids=["both-classes", "one-class", "three-rows"])
def test_a_table_holds_exactly_the_keys_the_privacy_guard_allows(n: int, positives: int):
    """The site's privacy guard (client/guard.py) withholds a table with any other key."""
    from common.metrics.classification import classification_table
    from common.metrics.regression import regression_table
    from common.metrics.tables import CLASSIFICATION_KEYS, REGRESSION_KEYS

    rng = np.random.default_rng(3)
    y = np.zeros(n)
    y[:positives] = 1
    score = rng.normal(size=n) + y
    assert set(classification_table(y, score, 0.5, bootstrap=20)) == CLASSIFICATION_KEYS
    assert set(regression_table(score * 10, score + rng.normal(size=n))) == REGRESSION_KEYS


def test_the_95_percent_quantile_is_scipys_to_the_last_bit():
    """common.metrics.base keeps SciPy out of the guard's imports with a literal."""
    from common.metrics.base import Z95

    assert Z95 == float(stats.norm.ppf(0.975))
