"""The federated model updated at one site (Steyerberg, *Clinical Prediction Models*, ch. 20:
recalibration and revision), on the site's own training rows, never leaving it.

A multicentre model can be worse at one hospital than that hospital's own model (another case
mix, a scanner the others lack); a model fitted on one hospital's rows alone is noisy. Between
the two, the site's own cross-validation chooses among:

- ``federated``: the model as it is;
- ``recalibrated``: its score's intercept and slope refitted (logistic recalibration, or a
  linear one for regression): the ranking stays, the risks fit the site;
- ``revised <c>``: its coefficients refitted on its selected features with an L2 penalty of
  ``c`` x the number of rows, centred on the federated coefficients (an empirical-Bayes
  shrinkage between the site's own fit and the multicentre one; a large ``c`` keeps the
  federated model, a small one lets the site's data speak);
- ``local``: the site's local-only model (its own screening and penalized fit).

Each is scored by its deviance on the held-out fold (the logistic log-loss, the squared error,
or for a Cox model Verweij & van Houwelingen's cross-validated partial likelihood: that of every
row less that of the rows fitted), summed over the site's folds; the one with the least is
refitted on every training row. Arrays are samples x features, float64; a Cox model's labels
are (n, 2) times and events, and its intercept stays 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from common.cox import fit_cox, site_cox_terms
from common.glm import ModelError, site_logistic_terms, with_intercept
from common.selection.model import FloatArray, IndexArray, LinearModel

#: The revision's penalties, as multiples of the rows it is fitted on.
REVISION_L2 = (10.0, 3.0, 1.0, 0.3, 0.1, 0.03)
#: The recalibration's slope is held near the federated one by this weak penalty (per row),
#: so a site whose score separates its classes still gets a finite slope.
RECALIBRATION_L2 = 0.01


@dataclass(frozen=True)
class SiteUpdate:
    """The model a site's cross-validation chose, which candidate it is, and every candidate's
    summed held-out deviance (infinite where it could not be fitted)."""
    model: LinearModel
    choice: str
    deviance: dict[str, float]


def penalized_fit(x: npt.ArrayLike, y: npt.ArrayLike, loss: str, prior: npt.ArrayLike,
                  l2: float, start: float = 0.0, max_iter: int = 100) -> FloatArray:
    """The GLM (intercept first) minimizing the loss (the logistic negative log-likelihood, or
    half the squared error) plus ``l2 / 2 * ||beta[1:] - prior||^2``: the intercept is free,
    the coefficients shrink towards ``prior`` (ridge regression, or Newton's method with step
    halving for the logistic loss)."""
    x, y, prior = (np.asarray(a, dtype=np.float64) for a in (x, y, prior))
    if loss == "cox":
        # the site's own risk sets; the intercept slot stays 0
        return np.concatenate([[0.0], fit_cox([(x, y[:, 0], y[:, 1])], l2=float(l2),
                                              max_iter=max_iter, prior=prior)])
    xi = with_intercept(x)
    penalty = np.full(xi.shape[1], float(l2))
    penalty[0] = 0.0
    centre = np.concatenate([[0.0], prior])
    if loss == "gaussian":
        try:
            beta: FloatArray = np.linalg.solve(xi.T @ xi + np.diag(penalty),
                                               xi.T @ y + penalty * centre)
        except np.linalg.LinAlgError:
            raise ModelError("the penalized fit's normal equations are singular") from None
        return beta
    def objective(b: FloatArray) -> float:
        eta = xi @ b
        return float(np.sum(np.logaddexp(0.0, eta) - y * eta)
                     + 0.5 * np.sum(penalty * (b - centre) ** 2))

    beta = np.concatenate([[start], prior])
    value = objective(beta)
    for _ in range(max_iter):
        terms = site_logistic_terms(x, y, beta)
        gradient = terms.gradient + penalty * (beta - centre)
        try:
            delta = np.linalg.solve(terms.hessian + np.diag(penalty), gradient)
        except np.linalg.LinAlgError:
            raise ModelError("the penalized fit's Hessian is singular") from None
        step = 1.0  # Newton's step, halved until the objective falls (far from the optimum)
        while step > 1e-8 and not objective(beta - step * delta) <= value:
            step /= 2
        beta = beta - step * delta
        value = objective(beta)
        if not np.isfinite(value):
            raise ModelError("the penalized fit does not converge")
        if np.max(np.abs(step * delta)) < 1e-10:
            break
    return beta


def recalibrate(x: npt.ArrayLike, y: npt.ArrayLike, model: LinearModel, loss: str
                ) -> LinearModel:
    """``model`` with its score's intercept and slope refitted on these rows."""
    score = model.score(x)
    n = len(score)
    a, b = penalized_fit(score[:, None], y, loss, [1.0], RECALIBRATION_L2 * n)
    return LinearModel(model.features, model.mean, model.sd,
                       np.concatenate([[a + b * model.beta[0]], b * model.beta[1:]]))


def revise(x: npt.ArrayLike, y: npt.ArrayLike, model: LinearModel, loss: str, strength: float
           ) -> LinearModel:
    """``model``'s selected features refitted on these rows with an L2 penalty of ``strength``
    x the rows, centred on its coefficients (its standardization kept)."""
    keep = model.beta[1:] != 0
    features: IndexArray = model.features[keep]
    mean, sd, prior = model.mean[keep], model.sd[keep], model.beta[1:][keep]
    z = (np.asarray(x, dtype=np.float64)[:, features] - mean) / sd
    beta = penalized_fit(z, y, loss, prior, strength * len(z), start=float(model.beta[0]))
    return LinearModel(features, mean, sd, beta)


def deviance(y: npt.ArrayLike, score: npt.ArrayLike, loss: str,
             fitted: npt.ArrayLike | None = None) -> float:
    """The summed held-out loss: the logistic log-loss of the scores (logits), the squared
    error, or for the Cox loss (``y`` and ``score`` of every row, ``fitted`` the mask of the
    rows the model was fitted on) the partial likelihood of every row less that of the fitted
    rows (Verweij & van Houwelingen 1993)."""
    y, score = np.asarray(y, dtype=np.float64), np.asarray(score, dtype=np.float64)
    if loss == "cox":
        inside = np.ones(len(y), bool) if fitted is None else np.asarray(fitted, bool)

        def partial(rows: npt.NDArray[np.bool_]) -> float:
            return site_cox_terms(score[rows, None], y[rows, 0], y[rows, 1], [1.0]).loss

        return partial(np.ones(len(y), bool)) - (partial(inside) if inside.any() else 0.0)
    if loss == "gaussian":
        return float(np.sum((y - score) ** 2))
    return float(np.sum(np.logaddexp(0.0, score) - y * score))


def candidates() -> list[str]:
    """Every candidate's name, in the order a tie is broken (the simplest first)."""
    return ["federated", "recalibrated", *(f"revised {c:g}" for c in REVISION_L2), "local"]


def _fit(name: str, x: FloatArray, y: FloatArray, federated: LinearModel, loss: str,
         local: Callable[[FloatArray, FloatArray], LinearModel]) -> LinearModel:
    if name == "federated":
        return federated
    if name == "recalibrated":
        return recalibrate(x, y, federated, loss)
    if name == "local":
        return local(x, y)
    return revise(x, y, federated, loss, float(name.removeprefix("revised ")))


def _comparable(y: FloatArray, loss: str) -> bool:
    """Whether a fold's training labels can fit every candidate: both classes for the
    logistic loss, an event for the Cox loss, two rows or more for the squared error."""
    if loss == "cox":
        return len(y) >= 2 and bool(y[:, 1].any())
    return bool(0 < y.sum() < len(y)) if loss == "logistic" else len(y) >= 2


def update_at_site(x: npt.ArrayLike, y: npt.ArrayLike, folds: npt.ArrayLike,
                   federated: LinearModel, loss: str,
                   local: Callable[[FloatArray, FloatArray], LinearModel],
                   only: Sequence[str] | None = None) -> SiteUpdate:
    """Choose, by the site's cross-validation over ``folds``, among the candidates (``only``
    these, in :func:`candidates`' order), and refit the chosen one on every row. ``local``
    fits the site's local-only model on the rows it is given. Every candidate is compared on
    the same folds: those whose training rows hold both classes (a fold without them would
    fail every candidate but the federated one); with none, the site cannot choose
    (:class:`ModelError`)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    folds = np.asarray(folds)
    names = [n for n in candidates() if only is None or n in only]
    total = dict.fromkeys(names, 0.0)
    usable = [fold for fold in np.unique(folds) if _comparable(y[folds != fold], loss)]
    if not usable:
        raise ModelError("no cross-validation fold leaves training rows of both classes (or "
                         "two rows to fit): the site's folds cannot choose an update")
    for fold in usable:  # every candidate on the same folds
        train, held = folds != fold, folds == fold
        for name in names:
            try:
                model = _fit(name, x[train], y[train], federated, loss, local)
                total[name] += (deviance(y, model.score(x), loss, train) if loss == "cox" else
                                deviance(y[held], model.score(x[held]), loss))
            except ModelError:
                total[name] = float("inf")
    choice = min(names, key=lambda n: total[n])  # the first of equals: the simplest
    if not np.isfinite(total[choice]):
        return SiteUpdate(federated, "federated", total)
    try:
        return SiteUpdate(_fit(choice, x, y, federated, loss, local), choice, total)
    except ModelError:  # fitted in every fold but not on all rows: the federated model
        return SiteUpdate(federated, "federated", total)
