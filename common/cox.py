"""The exact federated Cox proportional-hazards model, stratified by site (issue 18).

Each site's partial likelihood uses its own risk sets, so the study's log partial likelihood is
the sum of the sites' and so are its gradient and Hessian: Newton rounds on the summed terms give
the pooled fit stratified by site exactly, as :mod:`common.glm` does for the logistic model. A
site sends its terms (:func:`site_cox_terms`), never an event time.

Tied event times are handled as Efron's (the default; lifelines' and R's) or Breslow's method.
For one stratum, with ``w_i = exp(x_i'beta)``, each distinct event time ``t`` with ``d`` events
``D`` and the risk set ``R = {i: time_i >= t}``:

* Breslow: ``sum_D x_i'beta - d log S0``, ``S0 = sum_R w_i``;
* Efron: ``sum_D x_i'beta - sum_{l<d} log(S0 - l/d * sum_D w_i)``,

and their first and second derivatives from the same sums over ``x_i`` and ``x_i x_i'``. No
intercept (the baseline hazard absorbs it). The penalty is ``l2 / 2 * ||beta||^2`` added to the
summed negative log partial likelihood. No I/O and no Flower here. Arrays are samples x
features, float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from common.glm import FloatArray, ModelError

Ties = Literal["efron", "breslow"]

#: An unpenalized coefficient whose log hazard ratio over its feature's range exceeds this is
#: taken as infinite: the partial likelihood still rises towards it, below float64's precision
#: (a feature that separates the events from the survivors).
MAX_LOG_HAZARD_RANGE = 30.0
#: The most samples x features x features numbers one site's terms may hold at once (the
#: cumulative sums of ``x_i x_i'``): 400 MB of float64.
MAX_TERM_NUMBERS = 50_000_000


@dataclass(frozen=True)
class CoxTerms:
    """A site's contribution at the current coefficients: the gradient (p,) and Hessian (p, p)
    of its negative log partial likelihood, the value itself, and its number of events."""

    events: int
    gradient: FloatArray
    hessian: FloatArray
    loss: float


def checked_survival(x: npt.ArrayLike, time: npt.ArrayLike, event: npt.ArrayLike
                     ) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Features, follow-up times and event indicators as float64, checked: a finite
    (n, p) array, times finite and not negative, events 0 or 1, one of each per row."""
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event, dtype=np.float64)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise ModelError(f"features must be a finite (n_samples, n_features) array, got {x.shape}")
    n = x.shape[0]
    if t.shape != (n,) or e.shape != (n,):
        raise ModelError(f"times and events must be ({n},) arrays, got {t.shape} and {e.shape}")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ModelError("follow-up times must be finite and not negative")
    if not np.all((e == 0) | (e == 1)):
        raise ModelError("events must be 0 (censored) or 1 (event)")
    if n * x.shape[1] ** 2 > MAX_TERM_NUMBERS:
        raise ModelError(f"{n} rows x {x.shape[1]} features is more than the Cox terms' limit "
                         f"of {MAX_TERM_NUMBERS:,} numbers at one site")
    return x, t, e


def site_cox_terms(x: npt.ArrayLike, time: npt.ArrayLike, event: npt.ArrayLike,
                   beta: npt.ArrayLike, ties: Ties = "efron") -> CoxTerms:
    """Gradient, Hessian and value of this site's negative log partial likelihood at ``beta``
    (one stratum: the site's own risk sets)."""
    x, t, e = checked_survival(x, time, event)
    beta = np.asarray(beta, dtype=np.float64)
    p = x.shape[1]
    if beta.shape != (p,):
        raise ModelError(f"coefficients must be a ({p},) array, got {beta.shape}")
    if ties not in ("efron", "breslow"):
        raise ModelError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    eta = x @ beta
    shift = float(np.max(eta)) if len(eta) else 0.0  # exp without overflow; cancels in ratios
    w = np.exp(eta - shift)
    order = np.argsort(-t, kind="stable")  # latest first: a risk set is a prefix
    xs, ts, es, ws = x[order], t[order], e[order], w[order]
    s0 = np.cumsum(ws)
    s1 = np.cumsum(ws[:, None] * xs, axis=0)
    s2 = np.cumsum(ws[:, None, None] * xs[:, :, None] * xs[:, None, :], axis=0)
    gradient, hessian, loss = np.zeros(p), np.zeros((p, p)), 0.0
    times = np.unique(ts[es == 1])
    # the last row (in this order) at each time: the risk set of time t ends there
    last = len(ts) - 1 - np.searchsorted(ts[::-1], times, side="left")
    for t_j, end in zip(times, last, strict=True):
        dead = (ts == t_j) & (es == 1)
        d = int(dead.sum())
        d0, d1 = ws[dead].sum(), (ws[dead, None] * xs[dead]).sum(axis=0)
        d2 = (ws[dead, None, None] * xs[dead, :, None] * xs[dead, None, :]).sum(axis=0)
        loss -= float((eta[order][dead]).sum())
        gradient -= xs[dead].sum(axis=0)
        for k in range(d):
            f = k / d if ties == "efron" else 0.0
            a0, a1, a2 = s0[end] - f * d0, s1[end] - f * d1, s2[end] - f * d2
            loss += float(np.log(a0) + shift)
            mean = a1 / a0
            gradient += mean
            hessian += a2 / a0 - np.outer(mean, mean)
    return CoxTerms(int(e.sum()), gradient, hessian, loss)


def null_martingale_residuals(time: npt.ArrayLike, event: npt.ArrayLike) -> FloatArray:
    """Each row's martingale residual under the null model of its stratum (one site):
    ``event_i - H0(time_i)``, ``H0`` the Nelson-Aalen cumulative hazard of the site's rows.
    They sum to zero, and ``sum_i x_i * M_i`` is the Cox score at ``beta = 0`` (Breslow's
    ties): screening by their correlation with each feature ranks the features as the
    univariate score statistics do, from the comoments every model already sends."""
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event, dtype=np.float64)
    checked_survival(np.zeros((len(t), 0)), t, e)
    times = np.unique(t[e == 1])
    at_risk = len(t) - np.searchsorted(np.sort(t), times, side="left")
    deaths = np.array([np.sum((t == u) & (e == 1)) for u in times])
    cumulative = np.cumsum(deaths / at_risk) if len(times) else np.zeros(0)
    before = np.searchsorted(times, t, side="right")  # event times <= each row's time
    hazard = np.where(before > 0, cumulative[np.maximum(before - 1, 0)] if len(times) else 0.0,
                      0.0)
    residuals: FloatArray = e - hazard
    return residuals


def fit_cox(strata: Sequence[tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike]],
            ties: Ties = "efron", l2: float = 0.0, tolerance: float = 1e-10,
            max_iter: int = 100, prior: npt.ArrayLike | None = None) -> FloatArray:
    """The Cox model stratified by ``strata`` (one per site: features, times, events), by
    Newton's method with step halving on the summed terms plus the L2 penalty
    ``l2 / 2 * ||beta - prior||^2`` (``prior`` 0 by default; the start): what the federated
    rounds compute, in-process, and a site's refit towards the federated model. Returns the
    coefficients (p,).

    Raises
    ------
    ModelError
        No events, a singular Hessian (a constant or repeated feature; use ``l2 > 0``), or no
        convergence (a feature that separates events from survivors has no finite fit).
    """
    p = np.asarray(strata[0][0]).shape[1]
    if sum(int(np.sum(np.asarray(e))) for _, _, e in strata) == 0:
        raise ModelError("no events in any stratum: the Cox model has nothing to fit")
    centre = np.zeros(p) if prior is None else np.asarray(prior, dtype=np.float64)
    beta = centre.copy()

    def penalized(b: FloatArray) -> tuple[float, FloatArray, FloatArray]:
        parts = [site_cox_terms(x, t, e, b, ties) for x, t, e in strata]
        return (sum(c.loss for c in parts) + 0.5 * l2 * float((b - centre) @ (b - centre)),
                np.sum([c.gradient for c in parts], axis=0) + l2 * (b - centre),
                np.sum([c.hessian for c in parts], axis=0) + l2 * np.eye(p))

    value, gradient, hessian = penalized(beta)
    for _ in range(max_iter):
        try:
            delta = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            raise ModelError("the Cox Hessian is singular: a constant or repeated feature "
                             "(use l2 > 0)") from None
        step = 1.0
        while True:  # halve the step until the penalized loss falls
            candidate = beta - step * delta
            new = penalized(candidate)
            if new[0] <= value or step < 1e-8:
                break
            step /= 2
        beta, (value, gradient, hessian) = candidate, new
        if float(np.max(np.abs(step * delta))) < tolerance:
            if l2 == 0:
                _refuse_infinite(beta, strata)
            return beta
        if not np.all(np.isfinite(beta)) or np.max(np.abs(beta)) > 1e6:
            break
    raise ModelError(f"the Cox model did not converge in {max_iter} Newton steps (a feature "
                     "that separates events from survivors? use l2 > 0)")


def _refuse_infinite(beta: FloatArray, strata: Sequence[tuple[npt.ArrayLike, npt.ArrayLike,
                                                              npt.ArrayLike]]) -> None:
    x = np.vstack([np.asarray(x, dtype=np.float64) for x, _, _ in strata])
    spread = np.abs(beta) * (x.max(axis=0) - x.min(axis=0))
    if np.any(spread > MAX_LOG_HAZARD_RANGE):
        j = int(np.argmax(spread))
        raise ModelError(f"the Cox coefficient of feature {j} is infinite in effect (a log "
                         f"hazard ratio of {spread[j]:.0f} over its range: it separates events "
                         "from survivors); use l2 > 0")
