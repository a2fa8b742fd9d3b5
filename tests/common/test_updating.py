"""The federated model updated at one site (common/selection/updating.py): the penalized fits
against scipy's optimizer and the closed form, recalibration that keeps the ranking, and the
site's cross-validation choosing what its rows support."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.metrics import roc_auc_score

from common.selection.model import LinearModel
from common.selection.updating import (
    candidates,
    deviance,
    penalized_fit,
    recalibrate,
    revise,
    update_at_site,
)

RNG = np.random.default_rng(3)


def _objective(x, y, prior, l2, loss):  # noqa: ANN001, ANN202
    xi = np.column_stack([np.ones(len(x)), x])

    def f(beta):  # noqa: ANN001, ANN202
        eta = xi @ beta
        value = deviance(y, eta, loss) / (2 if loss == "gaussian" else 1)
        return value + 0.5 * l2 * np.sum((beta[1:] - prior) ** 2)
    return f


@pytest.mark.parametrize("loss", ["logistic", "gaussian"])
@pytest.mark.parametrize("l2", [0.5, 20.0])
def test_the_penalized_fit_is_the_minimum_of_its_objective(loss: str, l2: float):
    x = RNG.normal(size=(60, 3))
    eta = 0.3 + x @ [1.0, -0.5, 0.0]
    y = (RNG.random(60) < 1 / (1 + np.exp(-eta))).astype(float) if loss == "logistic" \
        else eta + RNG.normal(0, 0.5, 60)
    prior = np.array([0.5, 0.5, 0.5])
    beta = penalized_fit(x, y, loss, prior, l2)
    reference = minimize(_objective(x, y, prior, l2, loss), np.zeros(4), method="BFGS",
                         options={"gtol": 1e-10}).x
    np.testing.assert_allclose(beta, reference, atol=1e-5)
    # a huge penalty keeps the prior; only the intercept moves
    np.testing.assert_allclose(penalized_fit(x, y, loss, prior, 1e12)[1:], prior, atol=1e-8)


def _model(beta: list[float], p: int) -> LinearModel:
    return LinearModel(np.arange(p), np.zeros(p), np.ones(p), np.asarray(beta, dtype=float))


def test_recalibration_refits_intercept_and_slope_and_keeps_the_ranking():
    x = RNG.normal(size=(4000, 2))
    truth = _model([-0.5, 1.0, -1.0], 2)
    y = (RNG.random(4000) < 1 / (1 + np.exp(-truth.score(x)))).astype(float)
    overconfident = _model([1.0, 3.0, -3.0], 2)  # slope 3, intercept off
    fixed = recalibrate(x, y, overconfident, "logistic")
    np.testing.assert_allclose(fixed.beta, truth.beta, atol=0.15)
    assert roc_auc_score(y, fixed.score(x)) == roc_auc_score(y, overconfident.score(x))
    assert deviance(y, fixed.score(x), "logistic") < deviance(y, overconfident.score(x),
                                                              "logistic")
    # a score that separates the classes still gets a finite slope
    separated = (x[:, 0] > 0).astype(float)
    steep = recalibrate(x, separated, _model([0.0, 1.0, 0.0], 2), "logistic")
    assert np.all(np.isfinite(steep.beta)) and steep.beta[1] > 1


def test_revision_refits_only_the_selected_features_towards_the_federated_ones():
    x = RNG.normal(size=(80, 4))
    y = 1.0 + 2.0 * x[:, 0] + RNG.normal(0, 0.1, 80)
    federated = LinearModel(np.array([0, 2, 3]), np.array([0.1, 0.0, 0.0]),
                            np.array([1.0, 1.0, 2.0]), np.array([0.0, 1.0, 0.0, 0.4]))
    light = revise(x, y, federated, "gaussian", 1e-6)
    assert light.features.tolist() == [0, 3]  # feature 2 had a zero coefficient
    assert light.beta[1] == pytest.approx(2.0, abs=0.05)  # the site's data speak
    heavy = revise(x, y, federated, "gaussian", 1e6)
    np.testing.assert_allclose(heavy.beta[1:], [1.0, 0.4], atol=1e-3)  # the federated ones


def _site(n: int, effect: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = RNG.normal(size=(n, 3))
    eta = x @ [1.5, effect, 0.0]
    y = (RNG.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
    return x, y, np.arange(n) % 5


def test_the_site_keeps_a_federated_model_that_fits_it_and_updates_one_that_does_not():
    federated = _model([0.0, 1.5, 1.5, 0.0], 3)

    def local(x, y):  # noqa: ANN001, ANN202 (stand-in for the site's own recipe)
        return _model(penalized_fit(x, y, "logistic", np.zeros(3), 1.0).tolist(), 3)

    x, y, folds = _site(300, 1.5)
    same = update_at_site(x, y, folds, federated, "logistic", local)
    assert same.choice in ("federated", "recalibrated", "revised 10", "revised 3")
    assert set(same.deviance) == set(candidates())

    x, y, folds = _site(300, -1.5)  # the second feature works the other way at this site
    other = update_at_site(x, y, folds, federated, "logistic", local)
    assert other.choice not in ("federated", "recalibrated")
    assert other.deviance[other.choice] < 0.8 * other.deviance["federated"]
    held_x, held_y, _ = _site(2000, -1.5)
    assert roc_auc_score(held_y, other.model.score(held_x)) > roc_auc_score(
        held_y, federated.score(held_x)) + 0.1


def test_a_candidate_that_cannot_be_fitted_is_left_out_not_fatal():
    from common.glm import ModelError

    def broken(x, y):  # noqa: ANN001, ANN202
        raise ModelError("too few rows of a class")

    x, y, folds = _site(100, 1.5)
    update = update_at_site(x, y, folds, _model([0.0, 1.5, 1.5, 0.0], 3), "logistic", broken)
    assert update.deviance["local"] == float("inf") and update.choice != "local"


def test_a_choice_that_cannot_be_refitted_on_every_row_leaves_the_federated_model():
    from common.glm import ModelError

    fits = []

    def local_until_all_rows(x, y):  # noqa: ANN001, ANN202 (fits in the folds, not on all rows)
        fits.append(len(y))
        if len(y) == 300:
            raise ModelError("the local refit failed")
        return _model(penalized_fit(x, y, "logistic", np.zeros(3), 1.0).tolist(), 3)

    federated = _model([0.0, 1.5, 1.5, 0.0], 3)
    x, y, folds = _site(300, -1.5)
    update = update_at_site(x, y, folds, federated, "logistic", local_until_all_rows,
                            only=("federated", "local"))
    assert update.deviance["local"] < update.deviance["federated"]  # local won the CV...
    assert update.choice == "federated" and update.model is federated  # ...but cannot be refit
    assert fits[-1] == 300


def test_a_fold_whose_training_rows_lack_a_class_compares_no_candidate():
    from common.glm import ModelError

    federated = _model([0.0, 1.5, 1.5, 0.0], 3)

    def local(x, y):  # noqa: ANN001, ANN202
        return _model(penalized_fit(x, y, "logistic", np.zeros(3), 1.0).tolist(), 3)

    x, y, _ = _site(120, -1.5)
    folds = np.where(y == 1, 0, 1 + np.arange(len(y)) % 4)  # fold 0: every positive
    update = update_at_site(x, y, folds, federated, "logistic", local)
    # fold 0's training rows hold no positive: left out for every candidate, not charged as
    # infinite to those that cannot fit there (so the choice is not forced to the federated)
    assert all(np.isfinite(v) for v in update.deviance.values())
    kept = folds != 0
    assert update.deviance["federated"] == pytest.approx(
        deviance(y[kept], federated.score(x[kept]), "logistic"), rel=1e-12)
    with pytest.raises(ModelError, match="cannot choose"):
        update_at_site(x, y, np.where(y == 1, 0, 1), federated, "logistic", local)


def _cox_site(n: int, effect: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    event_time = rng.exponential(20.0 * np.exp(-(x @ [1.0, effect, 0.0])))
    censored = rng.uniform(5.0, 60.0, n)
    return x, np.column_stack([np.minimum(event_time, censored), event_time <= censored])


def test_a_cox_model_is_updated_at_a_site_by_its_cross_validated_partial_likelihood():
    from sklearn.model_selection import StratifiedKFold

    from common.cox import fit_cox, site_cox_terms

    federated = _model([0.0, 1.0, 1.0, 0.0], 3)

    def local(x, y):  # noqa: ANN001, ANN202
        return _model([0.0, *penalized_fit(x, y, "cox", np.zeros(3), 1.0)[1:]], 3)

    x, y = _cox_site(300, 1.0, 1)
    folds = np.zeros(len(y), int)
    for k, (_, held) in enumerate(StratifiedKFold(5, shuffle=True, random_state=0)
                                  .split(x, y[:, 1])):
        folds[held] = k
    same = update_at_site(x, y, folds, federated, "cox", local)
    assert same.choice in ("federated", "recalibrated", "revised 10", "revised 3")
    # the held-out criterion: every row's partial likelihood less the fitted rows', by hand
    inside = folds != 0
    lp = federated.score(x)
    by_hand = (site_cox_terms(lp[:, None], y[:, 0], y[:, 1], [1.0]).loss
               - site_cox_terms(lp[inside, None], y[inside, 0], y[inside, 1], [1.0]).loss)
    assert deviance(y, lp, "cox", inside) == pytest.approx(by_hand, rel=1e-12)

    x, y = _cox_site(300, -1.0, 2)  # the second feature works the other way at this site
    other = update_at_site(x, y, folds, federated, "cox", local)
    assert other.choice not in ("federated", "recalibrated")
    assert other.model.beta[0] == 0.0 and other.model.beta[2] < 0
    # a penalized Cox fit with a huge penalty stays at its prior, with none it is the MLE
    prior = np.array([0.5, 0.5, 0.5])
    np.testing.assert_allclose(penalized_fit(x, y, "cox", prior, 1e9)[1:], prior, atol=1e-6)
    np.testing.assert_allclose(penalized_fit(x, y, "cox", prior, 0.0)[1:],
                               fit_cox([(x, y[:, 0], y[:, 1])]), atol=1e-6)
