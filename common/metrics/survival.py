"""A survival model's metrics on a site's test rows (issue 18): what a site reports of a Cox
model's linear predictor, computed with scikit-survival's estimators, and released only as
numbers over groups of at least the protocol's minimum count.

* **Discrimination**: Harrell's C (every comparable pair; ties in the prediction count a half)
  and Uno's C (pairs weighted by the inverse probability of remaining uncensored, up to
  ``tau``, so that it does not depend on the censoring), each with a seeded bootstrap 95% CI and
  standard error (the latter for random-effects pooling across sites); the cumulative/dynamic
  AUC at each protocol time (events by ``t`` against those still event-free after it; Uno et
  al. 2007, Hung & Chiang 2010).
* **Accuracy of the predicted survival**: the Brier score at each time and the integrated Brier
  score over them (IPCW, Graf et al. 1999). The predicted survival ``S0(t) ** exp(lp)`` takes the
  baseline from the site's own training rows (Breslow's estimator): the study's Cox model is
  stratified by site, so each site has its own baseline hazard, and it never leaves the site.
* **Calibration at each time**: in risk groups (by the linear predictor) of at least
  ``min_count`` patients, the mean predicted survival against the Kaplan-Meier estimate.
* **Kaplan-Meier curves by predicted risk group**, on a fixed grid of months: never a step at one
  patient's time, and no value where fewer than ``min_count`` of the group are still at risk.

Times and events come from the site's rows (``time`` in months, ``event`` 1 or 0); a higher
linear predictor is a higher hazard. scikit-survival is imported inside the functions: the
privacy guard imports the metric modules in every site process and needs none of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from common.metrics.base import NAN, FloatArray, nan_if_fails

#: The most groups a site splits its test rows into by predicted risk.
MAX_RISK_GROUPS = 3
#: Names of the risk groups, by how many there are.
GROUP_NAMES = {1: ("all",), 2: ("low", "high"), 3: ("low", "intermediate", "high")}
#: Every risk group's name.
RISK_GROUPS = ("all", "low", "intermediate", "high")


def checked_times(time: npt.ArrayLike, event: npt.ArrayLike, score: npt.ArrayLike, what: str
                  ) -> tuple[FloatArray, npt.NDArray[np.bool_], FloatArray]:
    """Times, events and linear predictors as 1-D arrays of one length: times finite and not
    negative, events 0 or 1, predictions finite; ``what`` names the rows in the error."""
    t = np.asarray(time, dtype=float).ravel()
    e = np.asarray(event, dtype=float).ravel()
    s = np.asarray(score, dtype=float).ravel()
    if not t.shape == e.shape == s.shape:
        raise ValueError(f"{what}: {len(t)} times, {len(e)} events and {len(s)} predictions")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError(f"{what}: follow-up times must be finite and not negative")
    if not np.all(np.isin(e, (0.0, 1.0))):
        raise ValueError(f"{what}: events must be 0 (censored) or 1")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{what}: predictions hold missing or infinite values")
    return t, e.astype(bool), s


def _surv(event: npt.NDArray[np.bool_], time: FloatArray) -> Any:
    # deferred: heavy, loaded only where a survival table is made
    from sksurv.util import Surv

    return Surv.from_arrays(event, time)


def predicted_survival(train: tuple[FloatArray, npt.NDArray[np.bool_], FloatArray],
                       score: FloatArray, times: Sequence[float]) -> FloatArray:
    """``S(t | score)`` at ``times`` for each prediction ((n, len(times))), with the baseline
    hazard of the ``train`` rows (times, events, their linear predictors; Breslow's estimator)."""
    # deferred: heavy, loaded only where a survival table is made
    from sksurv.linear_model.coxph import BreslowEstimator

    t, e, s = train
    if not e.any():
        raise ValueError("training rows: no event to estimate the baseline hazard from")
    baseline = BreslowEstimator().fit(s, e.astype(int), t)
    # the step function is defined from 0 to the last training time: later times take its end
    end = float(baseline.baseline_survival_.x[-1])
    at = np.minimum(np.asarray(times, float), end)
    return np.vstack([fn(at) for fn in baseline.get_survival_function(score)])


def baseline_survival(time: npt.ArrayLike, event: npt.ArrayLike, score: npt.ArrayLike,
                      times: Sequence[float]) -> list[float] | None:
    """A site's baseline survival ``S0(t)`` at ``times`` (a linear predictor of 0), by
    Breslow's estimator on its training rows and their linear predictors; None without an
    event. It stays at the site: with the model's linear predictor it gives a patient's
    predicted survival, ``S0(t) ** exp(lp)`` (the site's nomogram)."""
    rows = checked_times(time, event, score, "training rows")
    survival = nan_if_fails(predicted_survival, rows, np.zeros(1), times)
    return None if survival is None else [float(v) for v in survival[0]]


def risk_groups(score: FloatArray, min_count: int) -> list[npt.NDArray[np.int64]]:
    """The rows split by predicted risk (lowest first) into at most :data:`MAX_RISK_GROUPS`
    groups of near-equal size, each of ``min_count`` rows or more (none when there are fewer
    rows than that)."""
    count = min(MAX_RISK_GROUPS, len(score) // max(min_count, 1))
    if count < 1:
        return []
    order = np.argsort(score, kind="stable")
    return [np.sort(part) for part in np.array_split(order, count)]


def kaplan_meier_on_grid(time: FloatArray, event: npt.NDArray[np.bool_], grid: Sequence[float],
                         min_count: int) -> tuple[list[float], list[int | None]]:
    """The Kaplan-Meier survival of these rows at each ``grid`` time and the number still at
    risk there: NaN and None where fewer than ``min_count`` are at risk."""
    # deferred: heavy, loaded only where a survival table is made
    from sksurv.nonparametric import kaplan_meier_estimator

    steps, survival = kaplan_meier_estimator(event, time)
    values: list[float] = []
    at_risk: list[int | None] = []
    for g in grid:
        risk = int(np.sum(time >= g))
        if risk < min_count:
            values.append(NAN)
            at_risk.append(None)
            continue
        before = np.searchsorted(steps, g, side="right")
        values.append(float(survival[before - 1]) if before else 1.0)
        at_risk.append(risk)
    return values, at_risk


def _concordances(train: Any, test: Any, event: npt.NDArray[np.bool_], time: FloatArray,
                  score: FloatArray, tau: float) -> tuple[float, float]:
    # deferred: heavy, loaded only where a survival table is made
    from sksurv.metrics import concordance_index_censored, concordance_index_ipcw

    # no comparable pair (a resample of few events) gives 0 / 0: NaN, without a warning
    with np.errstate(invalid="ignore", divide="ignore"):
        harrell = nan_if_fails(concordance_index_censored, event, time, score)
        uno = nan_if_fails(concordance_index_ipcw, train, test, score, tau=tau)
    return (float(harrell[0]) if harrell else NAN, float(uno[0]) if uno else NAN)


def survival_table(time: npt.ArrayLike, event: npt.ArrayLike, score: npt.ArrayLike,
                   train: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike], *,
                   times: Sequence[float] = (12.0, 24.0, 36.0),
                   grid: Sequence[float] = tuple(range(0, 61, 6)), min_count: int = 5,
                   bootstrap: int = 1000, seed: int = 0) -> dict[str, object]:
    """Everything a site reports of one Cox model on its test rows (``time``, ``event``,
    ``score``: the linear predictor), given its training rows ``train`` (times, events, linear
    predictors: the censoring distribution of the IPCW estimators and the baseline hazard):
    flat numbers (NaN where undefined, e.g. an AUC at a time after the last follow-up) and the
    per-time and per-group lists, each value over at least ``min_count`` patients."""
    # deferred: heavy, loaded only where a survival table is made
    from sksurv.metrics import brier_score, cumulative_dynamic_auc, integrated_brier_score

    t, e, s = checked_times(time, event, score, "test rows")
    train_rows = checked_times(*train, "training rows")
    times = [float(x) for x in times]
    out: dict[str, object] = {"n": len(t), "n_events": int(e.sum())}
    surv_train, surv_test = _surv(train_rows[1], train_rows[0]), _surv(e, t)
    # the censoring distribution (from the training rows) must cover tau and the times
    tau = min(max(times), float(train_rows[0].max()), float(t.max()))
    c_harrell, c_uno = _concordances(surv_train, surv_test, e, t, s, tau)
    out |= {"c_harrell": c_harrell, "c_uno": c_uno, "tau": tau}
    samples = _bootstrap(surv_train, t, e, s, tau, bootstrap, seed) if e.any() else None
    for name, column in (("c_harrell", 0), ("c_uno", 1)):
        values = samples[:, column] if samples is not None else np.array([])
        values = values[np.isfinite(values)]
        ok = len(values) >= max(10, bootstrap // 2)
        out[f"{name}_low"] = float(np.quantile(values, 0.025)) if ok else NAN
        out[f"{name}_high"] = float(np.quantile(values, 0.975)) if ok else NAN
        out[f"{name}_se"] = float(np.std(values, ddof=1)) if ok else NAN
    # the time-dependent measures at the times inside this site's follow-up of events
    inside = [x for x in times if e.any() and t[e].min() <= x < t.max()]
    auc = nan_if_fails(cumulative_dynamic_auc, surv_train, surv_test, s, inside) \
        if inside else None
    auc_at = dict(zip(inside, auc[0], strict=True)) if auc else {}
    out["auc_at"] = [[x, float(auc_at.get(x, NAN))] for x in times]
    out["mean_auc"] = float(auc[1]) if auc else NAN
    survival = nan_if_fails(predicted_survival, train_rows, s, times)
    brier = (nan_if_fails(brier_score, surv_train, surv_test, survival[:, [times.index(x)
                                                                           for x in inside]],
                          inside) if survival is not None and inside else None)
    brier_at = dict(zip(inside, brier[1], strict=True)) if brier else {}
    out["brier_at"] = [[x, float(brier_at.get(x, NAN))] for x in times]
    ibs = (nan_if_fails(integrated_brier_score, surv_train, surv_test,
                        survival[:, [times.index(x) for x in inside]], inside)
           if survival is not None and len(inside) >= 2 else None)
    out["integrated_brier"] = float(ibs) if ibs is not None else NAN
    groups = risk_groups(s, min_count)
    names = GROUP_NAMES.get(len(groups), ())
    out["calibration_at"] = [
        [x, name, len(rows), float(survival[rows, i].mean()) if survival is not None else NAN,
         kaplan_meier_on_grid(t[rows], e[rows], [x], min_count)[0][0]]
        for i, x in enumerate(times) for name, rows in zip(names, groups, strict=True)]
    out["kaplan_meier"] = {name: dict(zip(("survival", "at_risk"), kaplan_meier_on_grid(
        t[rows], e[rows], grid, min_count), strict=True)) for name, rows in
        zip(names, groups, strict=True)}
    out["grid"] = [float(g) for g in grid]
    return out


def _bootstrap(surv_train: Any, t: FloatArray, e: npt.NDArray[np.bool_], s: FloatArray,
               tau: float, n_boot: int, seed: int) -> FloatArray | None:
    """Harrell's and Uno's C over ``n_boot`` resamples of the test rows (seeded); None when
    ``n_boot`` is 0."""
    if n_boot <= 0:
        return None
    rng = np.random.default_rng(seed)
    out = np.full((n_boot, 2), NAN)
    for b in range(n_boot):
        rows = rng.integers(0, len(t), len(t))
        if e[rows].any():
            out[b] = _concordances(surv_train, _surv(e[rows], t[rows]), e[rows], t[rows],
                                   s[rows], tau)
    return out
