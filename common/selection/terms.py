"""The sites' half of the penalized fits: a site's sums for many fits at once, at the trial
coefficients the server asks for, and the site's cross-validation folds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

import numpy as np
import numpy.typing as npt

from common.cox import site_cox_terms
from common.glm import ModelError, with_intercept

FloatArray: TypeAlias = npt.NDArray[np.float64]
IndexArray: TypeAlias = npt.NDArray[np.int64]  # feature indices, fold numbers

LOSSES = ("logistic", "gaussian", "cox")


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
    if loss == "cox":  # no intercept: its row of the Hessian holds it where it is (at 0)
        cox = site_cox_terms(x, y[:, 0], y[:, 1], beta[1:])
        gradient, hessian = np.zeros(beta.size), np.zeros((beta.size, beta.size))
        gradient[1:], hessian[1:, 1:], hessian[0, 0] = cox.gradient, cox.hessian, len(x)
        return gradient, hessian, cox.loss
    xi = with_intercept(x)
    z = xi @ beta
    if loss == "logistic":
        p = 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function without overflow
        return (xi.T @ (p - y), (xi * (p * (1 - p))[:, None]).T @ xi,
                float(np.sum(np.logaddexp(0.0, z) - y * z)))
    r = z - y
    return xi.T @ r, xi.T @ xi, float(0.5 * r @ r)


def _loss_value(x: FloatArray, y: FloatArray, beta: FloatArray, loss: str) -> float:
    if loss == "cox":
        return site_cox_terms(x, y[:, 0], y[:, 1], beta[1:]).loss
    z = with_intercept(x) @ beta
    if loss == "logistic":
        return float(np.sum(np.logaddexp(0.0, z) - y * z))
    return float(0.5 * np.sum((z - y) ** 2))


def site_batch_terms(x: npt.ArrayLike, y: npt.ArrayLike, folds: IndexArray, request: BatchRequest,
                     loss: str, min_rows: int) -> BatchTerms:
    """This site's terms for every fit in ``request`` (``y``: the labels, or for the Cox loss
    the rows' times and events, (n, 2)). A fit over fewer than ``min_rows`` of
    this site's rows, or a held-out fold of 1 to ``min_rows - 1`` of them, is refused: its sums
    would come close to single patients' values. A fold with none of this site's rows (see
    :func:`assign_folds`) leaves all of them in."""
    if loss not in LOSSES:
        raise ModelError(f"unknown loss '{loss}'")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if y.shape != ((len(x), 2) if loss == "cox" else (len(x),)):
        wanted = "(n, 2) times and events" if loss == "cox" else "(n,) labels"
        raise ModelError(f"{len(x)} rows need {wanted}, got {y.shape}")
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
        held_out = int((~inside).sum())
        if inside.sum() < min_rows or 0 < held_out < min_rows:
            # the reason says no count: it leaves the site, and a count under the minimum is
            # what it protects
            raise ModelError(f"fold {fold} leaves fewer than {min_rows} training rows in or out "
                             "here: this site sends no sums over them (use fewer cv_folds)")
        g, h, value = _loss_terms(z[inside], y[inside], request.beta[j], loss)
        out.n[j], out.gradient[j], out.hessian[j], out.loss[j] = inside.sum(), g, h, value
        if held_out:
            out.n_out[j] = held_out
            # the Cox model's held-out loss is Verweij & van Houwelingen's (1993): the partial
            # likelihood of every row less that of the rows fitted, both at the fit (a held-out
            # row's risk set holds the fitted rows too)
            out.loss_out[j] = (_loss_value(z, y, request.beta[j], loss) - value
                               if loss == "cox" else
                               _loss_value(z[~inside], y[~inside], request.beta[j], loss))
    return out


def assign_folds(labels: npt.NDArray[np.generic], n_folds: int, seed: int, stratify: bool,
                 min_rows: int = 1, strata: Sequence[npt.NDArray[np.generic]] = ()
                 ) -> IndexArray:
    """Fold numbers 0..n_folds-1 for a site's training rows, seeded, built from atoms.

    The rows are grouped by label (when ``stratify``) and by each of ``strata`` in turn (e.g.
    the scanner, the nomogram's clinical levels) that keeps every group with rows at
    ``min_rows`` or more; each group is cut at random into ``min(n_folds, size // min_rows)``
    atoms of near-equal size (at least one), and each atom goes whole to one fold, the groups'
    atoms taking the folds in turn. So every fold x group cell holds 0 or at least ``min_rows``
    rows, and a coordinator that subtracts the sums of two fits (one without fold k), or adds
    sums over a group from another phase, gets a sum over at least that many patients of a
    label, never one patient's values. A group of ``n_folds * min_rows`` rows or more is spread
    over every fold exactly as a stratified split would; a smaller one fills fewer folds (its
    other folds hold none of it). With ``min_rows = 1`` and no strata: label-stratified folds.
    """
    labels = np.asarray(labels)
    keys = [labels if stratify else np.zeros(len(labels))]
    for stratum in strata:
        refined = [*keys, np.asarray(stratum)]
        if min(_group_sizes(refined)) >= min_rows:
            keys = refined
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for rows in _groups(keys):
        rows = rng.permutation(rows)
        n_atoms = int(np.clip(len(rows) // max(min_rows, 1), 1, n_folds))
        for k, atom in enumerate(np.array_split(rows, n_atoms)):
            folds[atom] = (offset + k) % n_folds
        offset += n_atoms
    return folds


def _groups(keys: list[npt.NDArray[np.generic]]) -> list[IndexArray]:
    """The row indices of each distinct combination of ``keys``, in a fixed order."""
    if not len(keys[0]):
        return []
    codes = np.column_stack([np.unique(k.astype(str), return_inverse=True)[1] for k in keys])
    _, group = np.unique(codes, axis=0, return_inverse=True)
    return [np.flatnonzero(group.ravel() == g) for g in range(int(group.max()) + 1)]


def _group_sizes(keys: list[npt.NDArray[np.generic]]) -> list[int]:
    return [len(rows) for rows in _groups(keys)] or [0]
