"""Federated feature selection and penalized GLMs, fitted many at a time.

A radiomics model is chosen the way a pooled study would choose it, from sums the sites send:

1. **screening** (:class:`Comoments`): each site sends per-feature counts, means, centred sums of
   squares and centred cross-products with the label; combined exactly (Chan et al.), they give
   the pooled standardization and each feature's Pearson correlation with the label
   (point-biserial for a binary label, monotone in Student's t). The ``top_k`` largest |r| go on.
2. **a penalized GLM** on the pooled-standardized screened features: logistic (classification)
   or Gaussian (regression), with an L1 (LASSO) or L2 (ridge) penalty on every coefficient but
   the intercept. The objective is ``sum(loss) / n + penalty``: scikit-learn's ``Lasso(alpha=lam)``
   for the Gaussian L1 case, ``LogisticRegression(C=1 / (n * lam))`` for the logistic ones.
3. **the penalty by cross-validation**: each site splits its training rows into folds (seeded,
   stratified); a fit "without fold k" sums every site's rows outside fold k, and its held-out
   loss is summed over fold k. The penalty grid runs from the smallest penalty that keeps every
   coefficient at zero (from the comoments) down to ``lambda_min_ratio`` of it.

All fits of a study (every penalty x fold x training set: the federated one and one per left-out
site) advance together, one message round a step: :class:`FitBatch` holds their state at the
server and asks for the sites' :class:`BatchTerms` at each fit's trial coefficients. Each step is
a proximal Newton step (coordinate descent on the exact quadratic model of the summed
likelihood) with a backtracking line search across rounds: for a ridge penalty it is Newton's
method, for a Gaussian loss it converges in one step. No I/O and no Flower; every array that
leaves a site is indexed by fit or by feature, never by patient.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeAlias, cast

import numpy as np
import numpy.typing as npt

from common.glm import ModelError, with_intercept

FloatArray: TypeAlias = npt.NDArray[np.float64]
IndexArray: TypeAlias = npt.NDArray[np.int64]  # feature indices, fold numbers

LOSSES = ("logistic", "gaussian")
PENALTIES = ("lasso", "ridge")


# --- screening and standardization ------------------------------------------------------------

@dataclass(frozen=True)
class Comoments:
    """Per-feature count, mean and centred sum of squares, (F,), the label's mean and centred sum
    of squares, and the centred cross-products of each feature with the label, (F,)."""

    n: int
    mean: FloatArray
    m2: FloatArray
    y_mean: float
    y_m2: float
    cross: FloatArray

    #: What may leave a site (:func:`common.records.check_sent`).
    AXES: ClassVar = {"mean": ("features",), "m2": ("features",), "cross": ("features",)}
    COUNTS: ClassVar = {"n": "min_rows"}

    @property
    def sd(self) -> FloatArray:
        """Population SD, with 1 where a feature is constant (it then stays at zero)."""
        sd = np.sqrt(self.m2 / self.n)
        return np.where(sd > 0, sd, 1.0)

    def correlation(self) -> FloatArray:
        """Pearson r of each feature with the label (0 where either is constant)."""
        denominator = np.sqrt(self.m2 * self.y_m2)
        return np.divide(self.cross, denominator, out=np.zeros_like(self.cross),
                         where=denominator > 0)


def site_comoments(x: npt.ArrayLike, y: npt.ArrayLike) -> Comoments:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ModelError(f"comoments need (n, F) features and (n,) labels, got {x.shape}, "
                         f"{y.shape}")
    mean, y_mean = x.mean(axis=0), float(y.mean())
    xc, yc = x - mean, y - y_mean
    return Comoments(x.shape[0], mean, (xc**2).sum(axis=0), y_mean, float(yc @ yc), xc.T @ yc)


def combine_comoments(parts: Sequence[Comoments]) -> Comoments:
    """Pooled comoments (Chan et al.'s pairwise update, exact up to rounding)."""
    if not parts:
        raise ModelError("no site sent comoments")
    total = parts[0]
    for part in parts[1:]:
        n = total.n + part.n
        dx, dy = part.mean - total.mean, part.y_mean - total.y_mean
        w = total.n * part.n / n
        total = Comoments(n, total.mean + dx * part.n / n, total.m2 + part.m2 + dx**2 * w,
                          total.y_mean + dy * part.n / n, total.y_m2 + part.y_m2 + dy**2 * w,
                          total.cross + part.cross + dx * dy * w)
    return total


def screen(moments: Comoments, top_k: int) -> IndexArray:
    """Indices of the ``top_k`` features with the largest |r| with the label (ties by index),
    in increasing order; constant features never pass."""
    r = np.abs(moments.correlation())
    order = np.lexsort((np.arange(r.size), -r))
    keep = [i for i in order[:top_k] if moments.m2[i] > 0]
    if not keep:
        raise ModelError("no feature varies across the training rows")
    return np.sort(np.asarray(keep, dtype=np.int64))


def lambda_max(moments: Comoments, features: IndexArray) -> float:
    """The smallest L1 penalty at which every coefficient of the standardized GLM is zero: the
    largest |gradient| / n at the intercept-only fit, ``|cross_j| / (n sd_j)`` for both losses."""
    return float(np.max(np.abs(moments.cross[features]) / (moments.n * moments.sd[features])))


def null_intercept(moments: Comoments, loss: str) -> float:
    """The intercept-only fit: the label's mean (Gaussian) or its logit (logistic)."""
    if loss == "gaussian":
        return moments.y_mean
    p = min(max(moments.y_mean, 1e-6), 1 - 1e-6)
    return float(np.log(p / (1 - p)))


# --- a linear predictor, as it travels ----------------------------------------------------------

@dataclass(frozen=True)
class LinearModel:
    """A fitted model: ``beta[0] + sum_j beta[1 + j] * (x[:, features[j]] - mean[j]) / sd[j]``
    (a logit for classification, the value for regression)."""

    features: IndexArray
    mean: FloatArray
    sd: FloatArray
    beta: FloatArray

    #: A site's local-only model: ``terms`` up to the protocol's screening_top_k.
    AXES: ClassVar = {"features": ("terms",), "mean": ("terms",), "sd": ("terms",),
                      "beta": ("coefficients",)}

    def __post_init__(self) -> None:
        k = np.shape(self.features)[0] if np.ndim(self.features) == 1 else -1
        if (k < 0 or np.shape(self.mean) != (k,) or np.shape(self.sd) != (k,)
                or np.shape(self.beta) != (k + 1,)):
            raise ModelError("a linear model needs k feature indices, k means, k SDs and "
                             "1 + k coefficients")
        if k and (np.min(self.features) < 0 or np.any(np.asarray(self.sd) <= 0)):
            raise ModelError("a linear model needs non-negative feature indices and SDs > 0")

    def score(self, x: npt.ArrayLike) -> FloatArray:
        z = (np.asarray(x, dtype=np.float64)[:, self.features] - self.mean) / self.sd
        scores: FloatArray = self.beta[0] + z @ self.beta[1:]
        return scores

    @property
    def selected(self) -> IndexArray:
        """Feature indices with a non-zero coefficient."""
        chosen: IndexArray = self.features[self.beta[1:] != 0]
        return chosen


# --- the sites' half: terms of many fits at once ------------------------------------------------

@dataclass(frozen=True)
class BatchRequest:
    """What the server asks a site for: per training set ``t`` its screened features and
    standardization ((T, k) each); per fit ``j`` its set, the fold it leaves out (-1 = none) and
    its trial coefficients ((J, 1 + k))."""

    features: IndexArray
    mean: FloatArray
    sd: FloatArray
    fit_set: IndexArray
    fit_fold: IndexArray
    beta: FloatArray


@dataclass(frozen=True)
class BatchTerms:
    """A site's sums for each fit ``j`` of a request: rows used, gradient (J, 1 + k), Hessian
    (J, 1 + k, 1 + k) and loss over the rows in the fit; rows and loss of the fold left out."""

    n: FloatArray
    gradient: FloatArray
    hessian: FloatArray
    loss: FloatArray
    n_out: FloatArray
    loss_out: FloatArray

    #: ``fits`` and ``coefficients``: the request's (J, 1 + k).
    AXES: ClassVar = {"n": ("fits",), "gradient": ("fits", "coefficients"),
                      "hessian": ("fits", "coefficients", "coefficients"), "loss": ("fits",),
                      "n_out": ("fits",), "loss_out": ("fits",)}
    COUNTS: ClassVar = {"n": "min_rows", "n_out": "min_rows"}


def _loss_terms(x: FloatArray, y: FloatArray, beta: FloatArray, loss: str
                ) -> tuple[FloatArray, FloatArray, float]:
    xi = with_intercept(x)
    z = xi @ beta
    if loss == "logistic":
        p = 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function without overflow
        return (xi.T @ (p - y), (xi * (p * (1 - p))[:, None]).T @ xi,
                float(np.sum(np.logaddexp(0.0, z) - y * z)))
    r = z - y
    return xi.T @ r, xi.T @ xi, float(0.5 * r @ r)


def _loss_value(x: FloatArray, y: FloatArray, beta: FloatArray, loss: str) -> float:
    z = with_intercept(x) @ beta
    if loss == "logistic":
        return float(np.sum(np.logaddexp(0.0, z) - y * z))
    return float(0.5 * np.sum((z - y) ** 2))


def site_batch_terms(x: npt.ArrayLike, y: npt.ArrayLike, folds: IndexArray, request: BatchRequest,
                     loss: str, min_rows: int) -> BatchTerms:
    """This site's terms for every fit in ``request``. A fit over fewer than ``min_rows`` of
    this site's rows, or a held-out fold smaller than that, is refused: its sums would come
    close to single patients' values."""
    if loss not in LOSSES:
        raise ModelError(f"unknown loss '{loss}'")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    j_count, width = request.beta.shape
    out = BatchTerms(np.zeros(j_count), np.zeros((j_count, width)),
                     np.zeros((j_count, width, width)), np.zeros(j_count), np.zeros(j_count),
                     np.zeros(j_count))
    standardized = {}
    for j in range(j_count):
        t, fold = int(request.fit_set[j]), int(request.fit_fold[j])
        if t not in standardized:
            feats = request.features[t].astype(np.int64)
            if feats.min() < 0 or feats.max() >= x.shape[1]:
                raise ModelError(f"training set {t}: feature index out of range")
            standardized[t] = (x[:, feats] - request.mean[t]) / request.sd[t]
        z = standardized[t]
        inside = folds != fold
        if inside.sum() < min_rows or (fold >= 0 and (~inside).sum() < min_rows):
            raise ModelError(f"fold {fold} leaves {int(inside.sum())} training rows in and "
                             f"{int((~inside).sum())} out here, fewer than {min_rows}: this site "
                             "sends no sums over them (use fewer cv_folds)")
        g, h, value = _loss_terms(z[inside], y[inside], request.beta[j], loss)
        out.n[j], out.gradient[j], out.hessian[j], out.loss[j] = inside.sum(), g, h, value
        if fold >= 0:
            out.n_out[j] = (~inside).sum()
            out.loss_out[j] = _loss_value(z[~inside], y[~inside], request.beta[j], loss)
    return out


def assign_folds(labels: npt.NDArray[np.generic], n_folds: int, seed: int, stratify: bool
                 ) -> IndexArray:
    """Fold numbers 0..n_folds-1 for a site's training rows, seeded, stratified by label."""
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=np.int64)
    groups = [np.flatnonzero(labels == v) for v in np.unique(labels)] if stratify \
        else [np.arange(len(labels))]
    offset = 0
    for rows in groups:
        rows = rng.permutation(rows)
        folds[rows] = (np.arange(len(rows)) + offset) % n_folds
        offset += len(rows)
    return folds


# --- the server's half: many fits, one round a step ---------------------------------------------

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


def proximal_newton_target(gradient: FloatArray, hessian: FloatArray, beta: FloatArray,
                           lam: float, penalty: str, max_sweeps: int = 5_000) -> FloatArray:
    """The minimizer of the quadratic model ``g'd + d'Hd/2 + penalty(beta + d)`` (per-row
    scale): Newton's target for a ridge penalty; for the L1 penalty, coordinate descent with soft
    thresholding, every few sweeps finished exactly by solving the equations of its active set
    (kept when the signs and the optimality conditions hold). The intercept is never penalized.
    """
    width = beta.size
    b = hessian @ beta - gradient
    if penalty == "ridge":
        ridge = np.full(width, lam)
        ridge[0] = 0.0
        try:
            # numpy's stubs type solve() as floating[Any]; float64 in, float64 out
            return cast(FloatArray, np.linalg.solve(hessian + np.diag(ridge), b))
        except np.linalg.LinAlgError:
            raise ModelError("singular Hessian: a constant or repeated feature") from None
    if hessian[0, 0] <= 0:
        raise ModelError("a fit has no rows")
    exact = _active_set_solution(hessian, b, lam, beta)  # the support rarely changes late on
    if exact is not None:
        return exact
    # Coordinate descent (scikit-learn's compiled Lasso) on the quadratic with the intercept
    # profiled out: H_s = H_rr - H_r0 H_0r / H_00, b_s likewise; with H_s = L L', minimizing
    # w'H_s w / 2 - b_s'w + lam |w|_1 is a Lasso of L^-1 b_s on L' with alpha = lam / k.
    # scikit-learn loads only for a fit the active set cannot solve (the sites import this
    # module too, and never fit)
    from scipy.linalg import cholesky, solve_triangular
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    h0 = hessian[1:, 0]
    reduced = hessian[1:, 1:] - np.outer(h0, h0) / hessian[0, 0]
    b_reduced = b[1:] - h0 * b[0] / hessian[0, 0]
    k = b_reduced.size
    jitter = 1e-12 * max(np.trace(reduced) / k, 1e-300)
    try:
        lower = cholesky(reduced + jitter * np.eye(k), lower=True)
    except np.linalg.LinAlgError:
        raise ModelError("the Hessian of a fit is not positive definite") from None
    lasso = Lasso(alpha=lam / k, fit_intercept=False, tol=1e-12, max_iter=max_sweeps * 20,
                  warm_start=True, selection="cyclic")
    lasso.coef_ = beta[1:].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lasso.fit(lower.T, solve_triangular(lower, b_reduced, lower=True))
    w = np.concatenate([[(b[0] - h0 @ lasso.coef_) / hessian[0, 0]], lasso.coef_])
    exact = _active_set_solution(hessian, b, lam, w)
    return exact if exact is not None else w


def _active_set_solution(hessian: FloatArray, b: FloatArray, lam: float, w: FloatArray
                         ) -> FloatArray | None:
    """The exact L1 quadratic minimizer on the support and signs of ``w``, or None when the
    optimality conditions fail (coordinate descent has not found the support yet)."""
    active = w != 0
    active[0] = True
    signs = np.sign(w)
    signs[0] = 0.0
    solution = np.zeros_like(w)
    try:
        solution[active] = np.linalg.solve(hessian[np.ix_(active, active)],
                                           b[active] - lam * signs[active])
    except np.linalg.LinAlgError:
        return None
    if np.any(np.sign(solution[1:][active[1:]]) != signs[1:][active[1:]]):
        return None
    slack = np.abs(b - hessian @ solution)[~active]
    return solution if np.all(slack <= lam * (1 + 1e-9)) else None


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


def run_in_process(batch: FitBatch,
                   sites: Sequence[tuple[npt.ArrayLike, npt.ArrayLike, IndexArray]],
                   members: Sequence[Sequence[int]], min_rows: int = 1) -> FitBatch:
    """Drive ``batch`` to the end with the sites' data at hand (tests; a site's own local-only
    model). ``members[t]`` lists the sites in training set ``t``."""
    while not batch.done:
        pending = batch.pending()
        parts = []
        for s, (x, y, folds) in enumerate(sites):
            mine = [j for j in pending if s in members[batch.fits[j].set_index]]
            terms = site_batch_terms(x, y, folds, batch.request(mine), batch.loss, min_rows)
            parts.append((mine, terms))
        update_by_site(batch, pending, parts)
    return batch


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



def fit_pooled(sites: Sequence[tuple[npt.ArrayLike, npt.ArrayLike, IndexArray]], loss: str,
               penalty: str, top_k: int, n_lambdas: int, folds: int, rule: str,
               min_rows: int = 1) -> tuple[LinearModel, FitBatch]:
    """Screening, the penalty path, cross-validation and the chosen model over ``sites`` (each
    ``(x, y, folds)``) in one process: what the federation computes, for a site's own
    local-only model and for tests."""
    moments = combine_comoments([site_comoments(x, y) for x, y, _ in sites])
    batch = run_in_process(new_batch([moments], loss, penalty, top_k, n_lambdas, folds),
                           sites, [list(range(len(sites)))], min_rows)
    return batch.model(0, rule), batch
