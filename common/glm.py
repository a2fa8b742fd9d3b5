"""Exact federated linear and logistic models, split where the data lives.

Each site sends sums over its own rows; the server combines them and fits. The fitted models are
those of a pooled fit, not approximations:

* **standardization**: per-feature count, mean and centred sum of squares
  (:func:`site_feature_moments`), combined exactly (:func:`combine_feature_moments`);
* **linear / ridge regression**: ``X'X``, ``X'y``, ``y'y`` (:func:`site_gram`); the server solves
  the normal equations (:func:`fit_linear`);
* **logistic regression, unpenalized or L2**: Newton's method (IRLS) on the summed gradient and
  Hessian of the log-likelihood (:func:`site_logistic_terms`, :func:`newton_step`), one round a
  step, to a step below ``tolerance``.

The intercept (first coefficient) is never penalized, as in scikit-learn. The penalty is
``l2 / 2 * ||w||^2`` added to the summed negative log-likelihood (scikit-learn's ``C`` is
``1 / l2``). No I/O and no Flower here; every array that leaves a site is indexed by feature.
Arrays are samples x features, float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias, overload

import numpy as np
import numpy.typing as npt

from common.errors import MyeloFedError

FloatArray: TypeAlias = npt.NDArray[np.float64]


class ModelError(MyeloFedError):
    """A federated model cannot be fitted as asked (singular system, no convergence, bad input)."""


@overload
def _checked(x: npt.ArrayLike, y: None = None) -> tuple[FloatArray, None]: ...


@overload
def _checked(x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[FloatArray, FloatArray]: ...


def _checked(x: npt.ArrayLike, y: npt.ArrayLike | None = None
             ) -> tuple[FloatArray, FloatArray | None]:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise ModelError(f"features must be a finite (n_samples, n_features) array, got {x.shape}")
    if y is None:
        return x, None
    y = np.asarray(y, dtype=np.float64)
    if y.shape != (x.shape[0],) or not np.all(np.isfinite(y)):
        raise ModelError(f"targets must be a finite ({x.shape[0]},) array, got {y.shape}")
    return x, y


def with_intercept(x: FloatArray) -> FloatArray:
    """A column of ones in front: (n_samples, 1 + n_features)."""
    return np.hstack([np.ones((x.shape[0], 1)), x])


# --- standardization --------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureMoments:
    """Count, mean and centred sum of squares of each feature, (F,)."""

    n: int
    mean: FloatArray
    m2: FloatArray

    @property
    def sd(self) -> FloatArray:
        """Population standard deviation (scikit-learn's StandardScaler)."""
        return np.sqrt(self.m2 / self.n)


def site_feature_moments(x: npt.ArrayLike) -> FeatureMoments:
    x, _ = _checked(x)
    mean = x.mean(axis=0)
    return FeatureMoments(x.shape[0], mean, ((x - mean) ** 2).sum(axis=0))


def combine_feature_moments(parts: Sequence[FeatureMoments]) -> FeatureMoments:
    """Pooled moments (Chan et al.'s pairwise update: no cancellation)."""
    if not parts:
        raise ModelError("no site sent feature moments")
    n, mean, m2 = parts[0].n, parts[0].mean, parts[0].m2
    for part in parts[1:]:
        total = n + part.n
        delta = part.mean - mean
        mean = mean + delta * (part.n / total)
        m2 = m2 + part.m2 + delta**2 * (n * part.n / total)
        n = total
    return FeatureMoments(n, mean, m2)


# --- linear / ridge ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Gram:
    """A site's ``X'X`` ((p+1, p+1), intercept first), ``X'y`` (p+1,), ``y'y`` and count."""

    n: int
    xtx: FloatArray
    xty: FloatArray
    yty: float


def site_gram(x: npt.ArrayLike, y: npt.ArrayLike) -> Gram:
    x, y = _checked(x, y)
    xi = with_intercept(x)
    return Gram(x.shape[0], xi.T @ xi, xi.T @ y, float(y @ y))


def fit_linear(parts: Sequence[Gram], l2: float = 0.0) -> FloatArray:
    """Coefficients (intercept first) of the pooled least-squares (``l2 = 0``) or ridge fit
    (scikit-learn's ``Ridge(alpha=l2)``: the intercept is not penalized)."""
    xtx = np.sum([p.xtx for p in parts], axis=0)
    xty = np.sum([p.xty for p in parts], axis=0)
    penalty = np.full(xtx.shape[0], float(l2))
    penalty[0] = 0.0
    try:
        return np.linalg.solve(xtx + np.diag(penalty), xty)
    except np.linalg.LinAlgError:
        raise ModelError("the pooled normal equations are singular: a feature constant or "
                         "repeated across all sites (use l2 > 0 or drop it)") from None


# --- logistic ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LogisticTerms:
    """A site's contribution at the current coefficients: the gradient (p+1,) and Hessian
    (p+1, p+1) of its negative log-likelihood, the value itself and its count."""

    n: int
    gradient: FloatArray
    hessian: FloatArray
    loss: float


def site_logistic_terms(x: npt.ArrayLike, y: npt.ArrayLike, beta: FloatArray) -> LogisticTerms:
    """Gradient and Hessian of sum_i log(1 + exp(-s_i x_i'beta)) over this site's rows."""
    x, y = _checked(x, y)
    if not np.all((y == 0) | (y == 1)):
        raise ModelError("logistic targets must be 0 or 1")
    xi = with_intercept(x)
    z = xi @ beta
    p = 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function without overflow
    loss = float(np.sum(np.logaddexp(0.0, z) - y * z))
    return LogisticTerms(x.shape[0], xi.T @ (p - y), (xi * (p * (1.0 - p))[:, None]).T @ xi,
                         loss)


@dataclass(frozen=True)
class NewtonStep:
    """The server's update: new coefficients and the size of the step taken."""

    beta: FloatArray
    step: float
    loss: float  # penalized loss at the coefficients the terms were computed at


def newton_step(parts: Sequence[LogisticTerms], beta: FloatArray, l2: float = 0.0
                ) -> NewtonStep:
    """One Newton step on the summed terms plus the L2 penalty (intercept not penalized)."""
    penalty = np.full(beta.shape[0], float(l2))
    penalty[0] = 0.0
    gradient = np.sum([p.gradient for p in parts], axis=0) + penalty * beta
    hessian = np.sum([p.hessian for p in parts], axis=0) + np.diag(penalty)
    loss = sum(p.loss for p in parts) + 0.5 * float(np.sum(penalty * beta**2))
    try:
        delta = np.linalg.solve(hessian, gradient)
    except np.linalg.LinAlgError:
        raise ModelError("the logistic Hessian is singular: a constant or repeated feature "
                         "(use l2 > 0)") from None
    return NewtonStep(beta - delta, float(np.max(np.abs(delta))), loss)


def fit_logistic(sites: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]], l2: float = 0.0,
                 tolerance: float = 1e-10, max_iter: int = 100) -> FloatArray:
    """Federated logistic regression in-process: each round, every site computes its terms at
    the current coefficients and the server takes a Newton step. Returns the coefficients
    (intercept first). Unpenalized data that separate the classes have no finite fit: refused.
    """
    n_features = np.asarray(sites[0][0]).shape[1]
    beta = np.zeros(n_features + 1)
    for i in range(max_iter):
        try:
            step = newton_step([site_logistic_terms(x, y, beta) for x, y in sites], beta, l2)
        except ModelError:
            if i == 0:
                raise
            break  # the Hessian vanished on the way: the coefficients run off to infinity
        beta = step.beta
        if not np.all(np.isfinite(beta)) or (l2 == 0 and np.max(np.abs(beta)) > 1e6):
            break
        if step.step < tolerance:
            return beta
    raise ModelError(f"logistic regression did not converge in {max_iter} Newton steps "
                     "(separable classes? use l2 > 0)")
