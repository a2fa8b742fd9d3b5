"""One fit's proximal Newton step: the minimizer of the quadratic model of its summed likelihood
plus the penalty (Newton's target for ridge; for the L1 penalty, coordinate descent finished
exactly on its active set)."""

from __future__ import annotations

import warnings
from typing import TypeAlias, cast

import numpy as np
import numpy.typing as npt

from common.glm import ModelError

FloatArray: TypeAlias = npt.NDArray[np.float64]


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
    # scikit-learn loads only for a fit the active set cannot solve: most processes that import
    # this module (every site's model rounds, the privacy guard) never need it
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
