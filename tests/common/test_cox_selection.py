"""The penalized Cox model in the federated fits (common/selection with the ``cox`` loss):
screening by the stratified score from the comoments, the ridge path equal to the exact Newton
fit of common/cox.py, the LASSO path meeting its optimality conditions on the pooled rows within
1e-6, and the cross-validation criterion of Verweij & van Houwelingen."""

from __future__ import annotations

import numpy as np
import pytest

from common.cox import null_martingale_residuals, site_cox_terms
from common.glm import ModelError
from common.selection.pooled import fit_pooled
from common.selection.screening import combine_comoments, screening_label, site_comoments
from common.selection.terms import BatchRequest, assign_folds, site_batch_terms

EFFECTS = np.array([0.8, -0.6, 0.0, 0.0, 0.4, 0.0])


def _sites(sizes: tuple[int, ...] = (60, 80, 70), seed: int = 0
           ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Sites with their own baseline hazard and feature scale: (x, [time, event], folds)."""
    rng = np.random.default_rng(seed)
    sites = []
    for s, n in enumerate(sizes):
        x = rng.normal(loc=0.3 * s, scale=1.0 + 0.2 * s, size=(n, EFFECTS.size))
        event_time = rng.exponential((20.0 + 15 * s) * np.exp(-x @ EFFECTS))
        censored = rng.uniform(6.0, 60.0, n)
        y = np.column_stack([np.minimum(event_time, censored), event_time <= censored])
        sites.append((x, y.astype(float), assign_folds(y[:, 1], 3, s, True)))
    return sites


def _pooled_loss(sites, beta, mean, sd, features):  # noqa: ANN001, ANN202
    terms = [site_cox_terms((x[:, features] - mean) / sd, y[:, 0], y[:, 1], beta)
             for x, y, _ in sites]
    return (sum(t.loss for t in terms), np.sum([t.gradient for t in terms], axis=0))


def test_the_screening_cross_products_are_the_stratified_cox_score_at_zero():
    sites = _sites()
    for x, y, _ in sites:
        residuals = null_martingale_residuals(y[:, 0], y[:, 1])
        assert abs(residuals.sum()) < 1e-9
        breslow = site_cox_terms(x, y[:, 0], y[:, 1], np.zeros(x.shape[1]), ties="breslow")
        np.testing.assert_allclose(x.T @ residuals, -breslow.gradient, atol=1e-9)
    moments = combine_comoments([site_comoments(x, screening_label(y, "cox"))
                                 for x, y, _ in sites])
    score = -np.sum([site_cox_terms(x, y[:, 0], y[:, 1], np.zeros(6), ties="breslow").gradient
                     for x, y, _ in sites], axis=0)
    np.testing.assert_allclose(moments.cross, score, atol=1e-9)
    with pytest.raises(ModelError, match=r"\(n, 2\) times and events"):
        screening_label(np.ones(5), "cox")


def test_the_ridge_path_is_the_exact_stratified_fit_and_the_lasso_path_is_optimal():
    from common.cox import fit_cox

    sites = _sites()
    n = sum(len(x) for x, _, _ in sites)
    ridge, batch = fit_pooled(sites, "cox", "ridge", 6, 4, 3, "min")
    mean, sd, features = batch.mean[0], batch.sd[0], batch.features[0]
    for lam, beta in zip(batch.grids[0], batch.coefficients(0), strict=True):
        assert beta[0] == 0.0  # the Cox model has no intercept
        exact = fit_cox([((x[:, features] - mean) / sd, y[:, 0], y[:, 1]) for x, y, _ in sites],
                        l2=lam * n)
        np.testing.assert_allclose(beta[1:], exact, atol=1e-6)

    lasso, batch = fit_pooled(sites, "cox", "lasso", 6, 6, 3, "min")
    mean, sd, features = batch.mean[0], batch.sd[0], batch.features[0]
    for lam, beta in zip(batch.grids[0], batch.coefficients(0), strict=True):
        _, gradient = _pooled_loss(sites, beta[1:], mean, sd, features)
        gradient /= n
        zero = beta[1:] == 0
        assert np.all(np.abs(gradient[zero]) <= lam + 1e-6)
        np.testing.assert_allclose(gradient[~zero], -lam * np.sign(beta[1:][~zero]), atol=1e-6)
    assert np.all(batch.coefficients(0)[0][1:] == 0)  # the grid starts where all are zero
    # the chosen model finds the effects (the true zeros may enter, with small coefficients)
    chosen = dict(zip(lasso.features, lasso.beta[1:], strict=True))
    assert chosen[0] > 0.3 and chosen[1] < -0.2 and chosen[4] > 0.1


def test_the_held_out_loss_is_the_full_partial_likelihood_less_the_fitted_rows():
    x, y, folds = _sites((80,))[0]
    beta = np.array([[0.0, 0.5, -0.4]])
    request = BatchRequest(np.array([[0, 1]]), np.zeros((1, 2)), np.ones((1, 2)),
                           np.array([0]), np.array([1]), beta)
    terms = site_batch_terms(x, y, folds, request, "cox", 5)
    inside = folds != 1
    full = site_cox_terms(x[:, :2], y[:, 0], y[:, 1], beta[0, 1:]).loss
    fitted = site_cox_terms(x[inside, :2], y[inside, 0], y[inside, 1], beta[0, 1:])
    assert terms.loss[0] == pytest.approx(fitted.loss, rel=1e-12)
    assert terms.loss_out[0] == pytest.approx(full - fitted.loss, rel=1e-12)
    assert terms.n_out[0] == (~inside).sum() and terms.gradient[0, 0] == 0.0
    with pytest.raises(ModelError, match=r"80 rows need \(n, 2\) times and events"):
        site_batch_terms(x, y[:, 0], folds, request, "cox", 5)
