from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

from common.glm import (
    ModelError,
    combine_feature_moments,
    fit_linear,
    fit_logistic,
    site_feature_moments,
    site_gram,
    site_logistic_terms,
)


def sites(seed: int = 0, n_features: int = 6, sizes: tuple[int, ...] = (40, 75, 110)
          ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per site: features (site-shifted), a 0/1 label and a continuous target."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, n_features)
    out = []
    for k, n in enumerate(sizes):
        x = rng.normal(0.3 * k, 1 + 0.2 * k, (n, n_features))
        z = x @ w * 0.6 - 0.2
        label = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
        out.append((x, label, 2.0 + x @ w + rng.normal(0, 1, n)))
    return out


def pooled(parts):
    return (np.vstack([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]))


def _sklearn_logistic(l2: float) -> LogisticRegression:
    if l2 == 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12,
                                          max_iter=1000)
            except TypeError:  # pragma: no cover - older scikit-learn
                return LogisticRegression(penalty=None, solver="newton-cholesky", tol=1e-12)
    return LogisticRegression(C=1.0 / l2, solver="newton-cholesky", tol=1e-12, max_iter=1000)


@pytest.mark.parametrize("l2", [0.0, 1.0, 10.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_federated_logistic_equals_the_pooled_sklearn_fit(seed: int, l2: float):
    parts = sites(seed)
    x, y, _ = pooled(parts)
    scaler = StandardScaler().fit(x)  # the study standardizes with pooled moments first
    fed = fit_logistic([(scaler.transform(p[0]), p[1]) for p in parts], l2=l2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _sklearn_logistic(l2).fit(scaler.transform(x), y)
    np.testing.assert_allclose(fed[0], ref.intercept_[0], atol=1e-6)
    np.testing.assert_allclose(fed[1:], ref.coef_[0], atol=1e-6)


@pytest.mark.parametrize("l2", [0.0, 5.0])
def test_federated_linear_equals_the_pooled_sklearn_fit(l2: float):
    parts = sites(2)
    x, _, t = pooled(parts)
    fed = fit_linear([site_gram(p[0], p[2]) for p in parts], l2=l2)
    ref = (Ridge(alpha=l2) if l2 else LinearRegression()).fit(x, t)
    np.testing.assert_allclose(fed[0], ref.intercept_, atol=1e-8)
    np.testing.assert_allclose(fed[1:], ref.coef_, atol=1e-8)


def test_pooled_standardization_from_moments():
    parts = sites(3)
    x, _, _ = pooled(parts)
    moments = combine_feature_moments([site_feature_moments(p[0]) for p in parts])
    scaler = StandardScaler().fit(x)
    np.testing.assert_allclose(moments.mean, scaler.mean_, rtol=1e-12)
    np.testing.assert_allclose(moments.sd, scaler.scale_, rtol=1e-12)
    assert moments.n == len(x)


def test_site_terms_hold_no_per_patient_dimension():
    x, y, t = sites(4, n_features=5, sizes=(23,))[0]
    beta = np.zeros(6)
    for payload in (site_feature_moments(x), site_gram(x, t), site_logistic_terms(x, y, beta)):
        for item in dataclasses.fields(payload):
            value = getattr(payload, item.name)
            if isinstance(value, np.ndarray):
                assert set(value.shape) <= {5, 6}, (type(payload).__name__, item.name)


def test_bad_input_and_separable_data_are_refused():
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    with pytest.raises(ModelError, match="did not converge"):
        fit_logistic([(x, np.array([0.0, 0.0, 1.0, 1.0]))])  # perfectly separable
    assert np.all(np.isfinite(fit_logistic([(x, np.array([0.0, 0.0, 1.0, 1.0]))], l2=1.0)))
    with pytest.raises(ModelError, match="0 or 1"):
        site_logistic_terms(x, np.array([0.0, 2.0, 1.0, 1.0]), np.zeros(2))
    with pytest.raises(ModelError, match="finite"):
        site_gram(np.array([[np.nan]]), np.array([1.0]))
    with pytest.raises(ModelError, match="singular"):
        fit_linear([site_gram(np.ones((5, 1)), np.arange(5.0))])
