"""The exact federated Cox model (common/cox.py): the sites' summed terms give the pooled fit
stratified by site, equal to lifelines (Efron's ties) and statsmodels (Breslow's), and the
terms are the derivatives of the partial likelihood."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.cox import checked_survival, fit_cox, site_cox_terms
from common.glm import ModelError

RNG = np.random.default_rng(18)
TRUE_BETA = np.array([0.7, -0.5, 0.0])


def _site(n: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Proportional hazards with a site-specific baseline (``scale``), administrative and random
    censoring, times rounded to whole months (ties)."""
    x = RNG.normal(size=(n, 3))
    event_time = RNG.exponential(scale / np.exp(x @ TRUE_BETA))
    censor = np.minimum(RNG.exponential(2 * scale, n), 3 * scale)
    time = np.ceil(np.minimum(event_time, censor))
    return x, time, (event_time <= censor).astype(float)


SITES = [_site(60, 12.0), _site(90, 30.0), _site(45, 20.0)]


def _pooled_frame() -> pd.DataFrame:
    return pd.concat([pd.DataFrame({"f0": x[:, 0], "f1": x[:, 1], "f2": x[:, 2], "time": t,
                                    "event": e, "site": i})
                      for i, (x, t, e) in enumerate(SITES)], ignore_index=True)


def test_the_sites_summed_terms_give_lifelines_stratified_efron_fit():
    from lifelines import CoxPHFitter

    frame = _pooled_frame()
    assert frame.duplicated(["time"]).any() and frame.event.mean() < 0.9  # ties, censoring
    reference = CoxPHFitter().fit(frame, duration_col="time", event_col="event",
                                  strata=["site"], fit_options={"precision": 1e-12})
    beta = fit_cox(SITES, "efron")
    np.testing.assert_allclose(beta, reference.params_.to_numpy(), atol=1e-6)
    # the log partial likelihood at the optimum, and the standard errors from the summed Hessian
    loss = sum(site_cox_terms(x, t, e, beta).loss for x, t, e in SITES)
    assert -loss == pytest.approx(reference.log_likelihood_, abs=1e-6)
    hessian = sum(site_cox_terms(x, t, e, beta).hessian for x, t, e in SITES)
    np.testing.assert_allclose(np.sqrt(np.diag(np.linalg.inv(hessian))),
                               reference.standard_errors_.to_numpy(), rtol=1e-5)


def test_breslow_ties_equal_statsmodels_phreg_with_strata():
    from statsmodels.duration.hazard_regression import PHReg

    frame = _pooled_frame()
    reference = PHReg(frame.time.to_numpy(), frame[["f0", "f1", "f2"]].to_numpy(),
                      status=frame.event.to_numpy(), strata=frame.site.to_numpy(),
                      ties="breslow").fit()
    np.testing.assert_allclose(fit_cox(SITES, "breslow"), reference.params, atol=1e-6)
    efron = PHReg(frame.time.to_numpy(), frame[["f0", "f1", "f2"]].to_numpy(),
                  status=frame.event.to_numpy(), strata=frame.site.to_numpy(),
                  ties="efron").fit()
    np.testing.assert_allclose(fit_cox(SITES, "efron"), efron.params, atol=1e-6)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_the_terms_are_the_partial_likelihoods_derivatives(ties: str):
    x, t, e = SITES[0]
    beta = np.array([0.3, -0.2, 0.1])
    terms = site_cox_terms(x, t, e, beta, ties)
    step = 1e-6
    for j in range(3):
        up, down = beta.copy(), beta.copy()
        up[j] += step
        down[j] -= step
        plus, minus = (site_cox_terms(x, t, e, b, ties) for b in (up, down))
        assert terms.gradient[j] == pytest.approx((plus.loss - minus.loss) / (2 * step),
                                                  abs=1e-5)
        np.testing.assert_allclose(terms.hessian[:, j],
                                   (plus.gradient - minus.gradient) / (2 * step), atol=1e-5)
    assert terms.events == int(e.sum())
    # a site's terms do not depend on the order of its rows
    shuffled = RNG.permutation(len(t))
    again = site_cox_terms(x[shuffled], t[shuffled], e[shuffled], beta, ties)
    assert again.loss == pytest.approx(terms.loss, rel=1e-12)
    np.testing.assert_allclose(again.hessian, terms.hessian, rtol=1e-10)


def test_ridge_meets_its_optimality_condition_and_shrinks():
    l2 = 5.0
    beta = fit_cox(SITES, "efron", l2=l2)
    gradient = sum(site_cox_terms(x, t, e, beta).gradient for x, t, e in SITES) + l2 * beta
    assert np.max(np.abs(gradient)) < 1e-6
    assert np.linalg.norm(beta) < np.linalg.norm(fit_cox(SITES, "efron"))


def test_bad_survival_data_is_named():
    x, t, e = SITES[0]
    with pytest.raises(ModelError, match="not negative"):
        checked_survival(x, np.where(np.arange(len(t)) == 3, -1.0, t), e)
    with pytest.raises(ModelError, match="not negative"):
        checked_survival(x, np.where(np.arange(len(t)) == 3, np.nan, t), e)
    with pytest.raises(ModelError, match="0 \\(censored\\) or 1"):
        checked_survival(x, t, np.where(np.arange(len(t)) == 3, 2.0, e))
    with pytest.raises(ModelError, match="arrays"):
        checked_survival(x, t[:-1], e)
    with pytest.raises(ModelError, match="no events"):
        fit_cox([(x, t, np.zeros_like(e))])
    with pytest.raises(ModelError, match="ties"):
        site_cox_terms(x, t, e, np.zeros(3), "exact")  # type: ignore[arg-type]
    events = (t < np.median(t)).astype(float)  # the early ones die, each with x0 = 10
    separated = np.column_stack([np.where(events == 1, 10.0, -10.0), x[:, 1:]])
    with pytest.raises(ModelError, match="feature 0 is infinite in effect"):
        fit_cox([(separated, t, events)])
    assert np.all(np.isfinite(fit_cox([(separated, t, events)], l2=1.0)))  # penalized: finite
