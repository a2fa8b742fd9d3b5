"""Federated screening and penalized GLMs against pooled scikit-learn fits."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Lasso, LogisticRegression

from common.glm import ModelError
from common.selection.batch import FitBatch, new_batch
from common.selection.pooled import fit_pooled, run_in_process
from common.selection.screening import combine_comoments, lambda_max, screen, site_comoments
from common.selection.terms import assign_folds, site_batch_terms


def _sites(seed: int, binary: bool, sizes=(60, 80, 70), n_features=12):  # noqa: ANN001, ANN202
    rng = np.random.default_rng(seed)
    w = np.zeros(n_features)
    w[:4] = [1.5, -1.0, 0.8, 0.5]
    out = []
    for s, n in enumerate(sizes):
        x = rng.normal(size=(n, n_features)) * (1 + np.arange(n_features)) + 10 * s
        z = (x - 10 * s) / (1 + np.arange(n_features))
        eta = z @ w + rng.normal(scale=0.5, size=n)
        y = (eta > 0).astype(float) if binary else 30 + 5 * eta
        out.append((x, y, assign_folds(y, 5, seed + s, stratify=binary)))
    return out


def _assert_l1_logistic_kkt(z, y, beta, lam) -> None:  # noqa: ANN001
    """Optimality of sum(loss) / n + lam * |w|_1: a zero gradient for the intercept and each
    non-zero coefficient's (less its penalty), at most lam in size for the zero ones."""
    eta = beta[0] + z @ beta[1:]
    gradient = np.concatenate([[np.mean(1 / (1 + np.exp(-eta)) - y)],
                               z.T @ (1 / (1 + np.exp(-eta)) - y) / len(y)])
    active = beta[1:] != 0
    assert abs(gradient[0]) < 1e-7
    np.testing.assert_allclose(gradient[1:][active], -lam * np.sign(beta[1:][active]),
                               atol=1e-7)
    assert np.all(np.abs(gradient[1:][~active]) <= lam + 1e-7)


def _pooled(sites):  # noqa: ANN001, ANN202
    return (np.vstack([x for x, _, _ in sites]), np.concatenate([y for _, y, _ in sites]),
            np.concatenate([f for _, _, f in sites]))


def test_comoments_combine_to_the_pooled_statistics() -> None:
    sites = _sites(0, binary=False)
    x, y, _ = _pooled(sites)
    pooled = combine_comoments([site_comoments(a, b) for a, b, _ in sites])
    assert pooled.n == len(y)
    np.testing.assert_allclose(pooled.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pooled.sd, x.std(axis=0), rtol=1e-12)
    r = [np.corrcoef(x[:, j], y)[0, 1] for j in range(x.shape[1])]
    np.testing.assert_allclose(pooled.correlation(), r, atol=1e-12)
    assert list(screen(pooled, 4)) == sorted(np.argsort(-np.abs(r))[:4].tolist())


def test_lambda_max_zeroes_every_coefficient_and_just_below_it_one_enters() -> None:
    sites = _sites(1, binary=False)
    x, y, _ = _pooled(sites)
    moments = combine_comoments([site_comoments(a, b) for a, b, _ in sites])
    features = np.arange(x.shape[1])
    top = lambda_max(moments, features)
    z = (x - moments.mean) / moments.sd
    assert np.all(Lasso(alpha=top * 1.0001).fit(z, y).coef_ == 0)
    assert np.count_nonzero(Lasso(alpha=top * 0.95).fit(z, y).coef_) >= 1


@pytest.mark.parametrize("loss,penalty", [("gaussian", "lasso"), ("logistic", "lasso"),
                                          ("logistic", "ridge")])
def test_every_fit_of_the_batch_equals_scikit_learn_on_the_pooled_rows(loss: str,
                                                                        penalty: str) -> None:
    sites = _sites(2, binary=loss == "logistic")
    x, y, folds = _pooled(sites)
    moments = [combine_comoments([site_comoments(a, b) for a, b, _ in sites])]
    batch = run_in_process(new_batch(moments, loss, penalty, top_k=8, n_lambdas=4, folds=5),
                           sites, [[0, 1, 2]])
    assert all(f.done for f in batch.fits) and batch.rounds < 60
    features = batch.features[0]
    z = (x[:, features] - batch.mean[0]) / batch.sd[0]
    checked = 0
    for fit in batch.fits[::2]:  # half of the fits, every kind of fold among them
        rows = folds != fit.fold
        n = rows.sum()
        if loss == "gaussian":
            ref = Lasso(alpha=fit.lam, tol=1e-12, max_iter=100_000).fit(z[rows], y[rows])
            atol = 1e-6
        else:
            ref = LogisticRegression(
                l1_ratio=1.0 if penalty == "lasso" else 0.0, C=1 / (n * fit.lam),
                solver="saga" if penalty == "lasso" else "lbfgs", tol=1e-12, random_state=0,
                max_iter=100_000).fit(z[rows], y[rows])
            # saga stops short (1e-4 here, its intercept is slow): the KKT conditions below
            # hold the L1 logistic fits to 1e-7 instead
            atol = 1e-3 if penalty == "lasso" else 1e-6
            if penalty == "lasso":
                _assert_l1_logistic_kkt(z[rows], y[rows], fit.beta, fit.lam)
        expected = np.concatenate([np.atleast_1d(ref.intercept_), np.ravel(ref.coef_)])
        np.testing.assert_allclose(fit.beta, expected, atol=atol, err_msg=f"fit {fit}")
        if fit.fold >= 0:  # the held-out loss is the pooled held-out fold's
            score = ref.predict(z[~rows]) if loss == "gaussian" else \
                ref.decision_function(z[~rows])
            held = (0.5 * np.sum((score - y[~rows]) ** 2) if loss == "gaussian"
                    else np.sum(np.logaddexp(0, score) - y[~rows] * score))
            assert fit.loss_out == pytest.approx(held, rel=1e-3, abs=1e-6)
        checked += 1
    assert checked >= 10


def test_cross_validation_picks_a_sparse_model_with_the_true_features() -> None:
    sites = _sites(3, binary=True, sizes=(120, 140, 130))
    model, batch = fit_pooled(sites, "logistic", "lasso", top_k=10, n_lambdas=8, folds=5,
                              rule="1se")
    mean, se = batch.cv_loss(0)
    assert mean.shape == (8,) and np.all(se > 0)
    chosen = batch.chosen(0, "1se")
    assert chosen <= batch.chosen(0, "min")  # 1se takes a penalty at least as large
    assert set(model.selected) <= set(range(12)) and {0, 1} <= set(model.selected)
    x, y, _ = _pooled(sites)
    assert np.mean((model.score(x) > 0) == y) > 0.8


def test_a_site_refuses_sums_over_too_few_rows() -> None:
    x, y, _ = _sites(4, binary=True)[0]
    folds = assign_folds(y, 5, 0, stratify=True)
    moments = [site_comoments(x, y)]
    batch = new_batch(moments, "logistic", "lasso", top_k=5, n_lambdas=2, folds=5)
    with pytest.raises(ModelError, match="fewer than 20") as refused:
        site_batch_terms(x, y, folds, batch.request(batch.pending()), "logistic", min_rows=20)
    # the reason leaves the site: it names the fold, not how many rows it holds
    held_out = np.bincount(folds[folds >= 0]).tolist()
    assert not any(f" {n} " in str(refused.value) for n in [*held_out, len(y) - held_out[0]])


def test_folds_are_stratified_and_seeded() -> None:
    y = np.array([0] * 30 + [1] * 12)
    folds = assign_folds(y, 4, 7, stratify=True)
    assert np.array_equal(folds, assign_folds(y, 4, 7, stratify=True))
    assert not np.array_equal(folds, assign_folds(y, 4, 8, stratify=True))
    for k in range(4):
        assert 2 <= np.sum(y[folds == k]) <= 4 and 10 <= np.sum(folds == k) <= 11


def test_unknown_loss_is_refused() -> None:
    with pytest.raises(ModelError, match="unknown loss"):
        FitBatch("poisson", "lasso", np.zeros((1, 2), int), np.zeros((1, 2)), np.ones((1, 2)),
                 np.ones((1, 2)), np.zeros(1), 2)


def test_a_linear_model_with_inconsistent_parts_is_refused_also_on_receipt() -> None:
    from common.records import PayloadError, from_record, to_record
    from common.selection.model import LinearModel

    good = LinearModel(np.array([0, 3]), np.zeros(2), np.ones(2), np.array([0.1, 1.0, -1.0]))
    assert np.allclose(good.score(np.eye(4)), [1.1, 0.1, 0.1, -0.9])
    with pytest.raises(ModelError, match="1 \\+ k coefficients"):
        LinearModel(np.array([0, 3]), np.zeros(2), np.ones(2), np.zeros(2))
    with pytest.raises(ModelError, match="SDs > 0"):
        LinearModel(np.array([0, 3]), np.zeros(2), np.array([1.0, 0.0]), np.zeros(3))
    record = to_record(good)
    record["arrays"]["sd"] = type(record["arrays"]["sd"])(np.array([1.0, -1.0]))
    with pytest.raises(PayloadError, match="LinearModel from a site: .*SDs > 0"):
        from_record(record, LinearModel)
