"""The server's half of the penalized fits: every fit of a study (penalty x fold x training set)
advanced together, one message round a step, and the penalty grid they run along."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias, cast

import numpy as np
import numpy.typing as npt

from common.glm import ModelError
from common.selection.model import LinearModel
from common.selection.screening import Comoments, lambda_max, null_intercept, screen
from common.selection.solver import proximal_newton_target
from common.selection.terms import LOSSES, BatchRequest, BatchTerms

FloatArray: TypeAlias = npt.NDArray[np.float64]
IndexArray: TypeAlias = npt.NDArray[np.int64]  # feature indices, fold numbers

PENALTIES = ("lasso", "ridge")


@dataclass
class _Fit:
    set_index: int
    fold: int
    lam_index: int
    lam: float
    trial: FloatArray
    beta: FloatArray | None = None
    objective: float = np.inf
    direction: FloatArray | None = None
    step: float = 1.0
    rounds: int = 0
    done: bool = False
    n: float = 0.0
    n_out: float = 0.0
    loss_out: float = 0.0
    hessian: FloatArray | None = None  # the summed Hessian at ``beta``


@dataclass
class FitBatch:
    """Every fit of a study, advanced one round at a time (the server's state).

    ``sets``: per training set, its screened features, pooled standardization, the null-model
    intercept and its penalty grid. ``folds`` is the number of CV folds (each set then has
    ``len(grid) * (folds + 1)`` fits, fold -1 being all its rows)."""

    loss: str
    penalty: str
    features: IndexArray
    mean: FloatArray
    sd: FloatArray
    grids: FloatArray
    intercepts: FloatArray
    folds: int
    tolerance: float = 1e-8
    max_rounds: int = 100
    fits: list[_Fit] = field(default_factory=list)
    rounds: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES or self.penalty not in PENALTIES:
            raise ModelError(f"unknown loss/penalty '{self.loss}'/'{self.penalty}'")
        width = self.features.shape[1] + 1
        for t, grid in enumerate(self.grids):
            for lam_index, lam in enumerate(grid):
                for fold in range(-1, self.folds):
                    start = np.zeros(width)
                    start[0] = self.intercepts[t]
                    self.fits.append(_Fit(t, fold, lam_index, float(lam), start))

    @property
    def done(self) -> bool:
        return all(f.done for f in self.fits) or self.rounds >= self.max_rounds

    def pending(self, sets: Sequence[int] | None = None) -> list[int]:
        """Indices of the fits still running (of the given training sets)."""
        return [j for j, f in enumerate(self.fits)
                if not f.done and (sets is None or f.set_index in sets)]

    def request(self, fits: Sequence[int]) -> BatchRequest:
        return BatchRequest(self.features, self.mean, self.sd,
                            np.array([self.fits[j].set_index for j in fits], dtype=np.int64),
                            np.array([self.fits[j].fold for j in fits], dtype=np.int64),
                            np.array([self.fits[j].trial for j in fits]).reshape(
                                len(fits), self.features.shape[1] + 1))

    def _penalty_value(self, fit: _Fit, beta: FloatArray) -> float:
        if self.penalty == "lasso":
            return fit.lam * float(np.sum(np.abs(beta[1:])))
        return 0.5 * fit.lam * float(np.sum(beta[1:] ** 2))

    def update(self, fits: Sequence[int], parts: Sequence[BatchTerms]) -> None:
        """One round: the sites' terms (each for the same ``fits``, in order) at the trial
        coefficients; each fit accepts or backtracks, then takes its next step."""
        self.rounds += 1
        n = np.sum([p.n for p in parts], axis=0)
        gradient = np.sum([p.gradient for p in parts], axis=0)
        hessian = np.sum([p.hessian for p in parts], axis=0)
        loss = np.sum([p.loss for p in parts], axis=0)
        n_out = np.sum([p.n_out for p in parts], axis=0)
        loss_out = np.sum([p.loss_out for p in parts], axis=0)
        for i, j in enumerate(fits):
            fit = self.fits[j]
            fit.rounds += 1
            objective = loss[i] / n[i] + self._penalty_value(fit, fit.trial)
            if fit.beta is not None and objective > fit.objective + 1e-12 * abs(fit.objective):
                fit.step /= 2  # no decrease: backtrack along the same direction
                if fit.step < 1e-10:
                    fit.done = True
                else:
                    assert fit.direction is not None  # set in the same round as fit.beta
                    fit.trial = fit.beta + fit.step * fit.direction
                continue
            gain = fit.objective - objective  # inf on the first round
            fit.beta, fit.objective = fit.trial, objective
            fit.n, fit.n_out, fit.loss_out = n[i], n_out[i], loss_out[i]
            fit.hessian = hessian[i]
            target = proximal_newton_target(gradient[i] / n[i], hessian[i] / n[i], fit.beta,
                                            fit.lam, self.penalty)
            fit.direction, fit.step = target - fit.beta, 1.0
            if (np.max(np.abs(fit.direction)) < self.tolerance
                    or gain < 1e-13 * max(1.0, abs(objective))):
                # the coefficients evaluated last are the fit (a step that no longer lowers
                # the objective is rounding in the subproblem's solution, not progress)
                fit.done = True
            else:
                fit.trial = target

    def coefficients(self, set_index: int, fold: int = -1) -> FloatArray:
        """(L, 1 + k): the fits of one set and fold along its penalty grid."""
        return np.array([f.beta for f in self.fits
                         if f.set_index == set_index and f.fold == fold])

    def cv_loss(self, set_index: int) -> tuple[FloatArray, FloatArray]:
        """Mean held-out loss per row along the grid, and its standard error across folds."""
        per_fold = np.zeros((len(self.grids[set_index]), self.folds))
        for f in self.fits:
            if f.set_index == set_index and f.fold >= 0:
                per_fold[f.lam_index, f.fold] = f.loss_out / max(f.n_out, 1.0)
        return per_fold.mean(axis=1), per_fold.std(axis=1, ddof=1) / np.sqrt(self.folds)

    def chosen(self, set_index: int, rule: str) -> int:
        """Index in the grid of the chosen penalty: the minimum CV loss, or (``"1se"``) the
        largest penalty within one standard error of it."""
        mean, se = self.cv_loss(set_index)
        best = int(np.argmin(mean))
        if rule == "min":
            return best
        return int(np.flatnonzero(mean <= mean[best] + se[best])[0])  # the grid decreases

    def covariance(self, set_index: int, lam_index: int = 0) -> FloatArray:
        """The coefficients' covariance of one set's fit on all its rows (the first penalty
        of its grid by default): the inverse of the summed Hessian of the penalized objective at
        the fit (for a ridge penalty; an L1 penalty has no such estimate). The Cox model's
        intercept slot is a placeholder: its row and column mean nothing."""
        if self.penalty != "ridge":
            raise ModelError("a covariance needs the ridge penalty's smooth objective")
        fit = next(f for f in self.fits if f.set_index == set_index and f.fold == -1
                   and f.lam_index == lam_index)
        if fit.hessian is None:
            raise ModelError("the fit has not run")
        penalty = np.full(fit.hessian.shape[0], fit.n * fit.lam)
        penalty[0] = 0.0
        try:
            covariance = cast(FloatArray, np.linalg.inv(fit.hessian + np.diag(penalty)))
        except np.linalg.LinAlgError:
            raise ModelError("the fit's Hessian is singular") from None
        return covariance

    def model(self, set_index: int, rule: str) -> LinearModel:
        beta = self.coefficients(set_index)[self.chosen(set_index, rule)]
        return LinearModel(self.features[set_index], self.mean[set_index], self.sd[set_index],
                           beta)


def lambda_grid(largest: float, count: int, penalty: str, ratio: float = 0.01) -> FloatArray:
    """A decreasing log-spaced penalty grid. L1: from ``largest`` (all coefficients zero) to
    ``ratio`` of it; ridge: the same span shifted one decade up (ridge keeps every feature)."""
    largest = max(largest, 1e-12)
    if penalty == "ridge":
        largest *= 10.0
    return largest * np.logspace(0, np.log10(ratio), count)


def new_batch(sets: Sequence[Comoments], loss: str, penalty: str, top_k: int, n_lambdas: int,
              folds: int) -> FitBatch:
    """The fits of a study: one training set per element of ``sets`` (its pooled comoments)."""
    features = np.array([screen(m, top_k) for m in sets])  # same k for every set
    k = min(len(f) for f in features)
    features = np.array([f[:k] for f in features])
    mean = np.array([m.mean[f] for m, f in zip(sets, features, strict=True)])
    sd = np.array([m.sd[f] for m, f in zip(sets, features, strict=True)])
    grids = np.array([lambda_grid(lambda_max(m, f), n_lambdas, penalty)
                      for m, f in zip(sets, features, strict=True)])
    intercepts = np.array([null_intercept(m, loss) for m in sets])
    return FitBatch(loss, penalty, features, mean, sd, grids, intercepts, folds)


def update_by_site(batch: FitBatch, pending: Sequence[int],
                    parts: Sequence[tuple[Sequence[int], BatchTerms]]) -> None:
    """Sum each site's terms into the rows of the fits it took part in, then update."""
    width = batch.features.shape[1] + 1
    index = {j: i for i, j in enumerate(pending)}
    total = BatchTerms(np.zeros(len(pending)), np.zeros((len(pending), width)),
                       np.zeros((len(pending), width, width)), np.zeros(len(pending)),
                       np.zeros(len(pending)), np.zeros(len(pending)))
    for fits, terms in parts:
        rows = [index[j] for j in fits]
        for name in ("n", "gradient", "hessian", "loss", "n_out", "loss_out"):
            getattr(total, name)[rows] += getattr(terms, name)
    batch.update(pending, [total])
