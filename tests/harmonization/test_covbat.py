"""Federated CovBat equals CovBat on the pooled rows (neuroCombat's ComBat, scikit-learn's PCA,
neuroCombat without EB on the scores, as the authors' code runs them) within 1e-8 x SD, and it
removes a scanner's covariance that ComBat leaves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA

from common.errors import HarmonizationError
from harmonization.combat.design import CombatOptions, Design
from harmonization.combat.model import SiteTable, fit_combat
from harmonization.covbat import (
    ResidualProducts,
    fit_covbat,
    principal_axes,
    score_design,
    site_residual_products,
)
from tests.harmonization.test_combat import make_table

neuroCombat = pytest.importorskip("neuroCombat", reason="neuroCombat 0.2.12 is a test dependency")


def _reference(covars: pd.DataFrame, y: np.ndarray, pct_var: float) -> np.ndarray:
    """CovBat on pooled rows, step by step as Chen et al.'s Python code runs it."""
    frame = covars[["batch", "sex", "stage", "age"]].copy()
    out = neuroCombat.neuroCombat(dat=y.T.copy(), covars=frame, batch_col="batch",
                                  categorical_cols=["sex", "stage"], continuous_cols=["age"])
    est = out["estimates"]
    location = est["stand.mean"] + est["mod.mean"]
    scale = np.sqrt(est["var.pooled"])
    residuals = ((out["data"] - location) / scale).T
    mean = residuals.mean(axis=0)
    pca = PCA().fit(residuals - mean)
    scores = pca.transform(residuals - mean)
    k = int(np.argmax(np.cumsum(pca.explained_variance_ratio_) > pct_var)) + 1
    scores[:, :k] = neuroCombat.neuroCombat(dat=scores[:, :k].T.copy(), covars=frame[["batch"]],
                                            batch_col="batch", eb=False)["data"].T
    return ((mean + scores @ pca.components_).T * scale + location).T


def _design(covars: pd.DataFrame) -> Design:
    return Design.from_values(covars.batch, covars, ("sex", "stage"), ("age",))


OPTIONS = CombatOptions(min_batch_size=8, min_cell=3)


@pytest.mark.parametrize("pct_var", [0.5, 0.95])
@pytest.mark.parametrize("seed", [0, 1])
def test_federated_equals_covbat_on_the_pooled_rows(seed: int, pct_var: float):
    sites, covars, y = make_table(seed)
    expected = _reference(covars, y, pct_var)
    model = fit_covbat(sites, _design(covars), OPTIONS, pct_var=pct_var)
    got = np.empty_like(y)
    for site in sites:
        rows = covars.index[covars.site == site.name].to_numpy()
        got[rows] = model.transform(site.features, site.batch, site.covariates)
    tolerance = 1e-8 * y.std(axis=0)
    assert np.all(np.abs(got - expected) <= tolerance), np.max(np.abs(got - expected) / tolerance)
    assert 0 < model.axes.components.shape[1] < y.shape[1]
    assert model.axes.explained > pct_var


def test_covbat_brings_a_scanners_covariance_towards_the_others_where_combat_cannot():
    rng = np.random.default_rng(4)
    n, f = 120, 6
    batch = np.array(["a", "b"] * (n // 2))
    y = rng.normal(0, 1, (n, f))
    shared = rng.normal(0, 1, n)
    y[batch == "b", :3] += 1.5 * shared[batch == "b", None]  # scanner b couples features 0-2
    y[batch == "b"] /= y[batch == "b"].std(axis=0)  # same variances: ComBat sees nothing
    covariates = {"age": rng.normal(60, 8, n).tolist()}
    site = SiteTable("one", y, batch.tolist(), covariates)
    design = Design(("a", "b"), continuous=("age",))

    def coupling(x: np.ndarray) -> float:  # how much more features 0-2 covary on b than a
        def mean_r(rows: np.ndarray) -> float:
            return float(np.corrcoef(x[rows][:, :3].T)[np.triu_indices(3, 1)].mean())
        return mean_r(batch == "b") - mean_r(batch == "a")

    combat = fit_combat([site], design, CombatOptions(min_batch_size=5, min_cell=1))
    covbat = fit_covbat([site], design, CombatOptions(min_batch_size=5, min_cell=1), n_pc=2)
    before = coupling(combat.transform(y, batch.tolist(), covariates))
    after = coupling(covbat.transform(y, batch.tolist(), covariates))
    assert before > 0.5 and after < 0.6 * before  # the scanners' covariances move together


def test_the_scores_keep_an_estimation_only_outcome_and_drop_the_applied_covariates():
    design = Design(("a", "b"), (("label", ("0", "1")), ("sex", ("F", "M"))), ("age",),
                    fit_only=("label",))
    scores = score_design(design)
    assert scores.categorical == (("label", ("0", "1")),) and scores.continuous == ()
    assert scores.fit_only == ("label",)


def test_sums_and_axes_refuse_bad_input():
    with pytest.raises(HarmonizationError, match="finite"):
        site_residual_products(np.array([[np.nan, 1.0]]))
    with pytest.raises(HarmonizationError, match="no site"):
        principal_axes([])
    one = ResidualProducts(1, np.ones(2), np.eye(2))
    with pytest.raises(HarmonizationError, match="two training rows"):
        principal_axes([one])
    assert principal_axes([site_residual_products(np.eye(3))], n_pc=2).components.shape == (3, 2)
