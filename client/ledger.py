"""The site's release ledger: which patients every sum this site has sent was over, so that no
combination of its replies can isolate fewer than :data:`common.payloads.MIN_ROWS_SENT` of them.

A curious coordinator can add and subtract the sums a site sends. Each sum of features covers a
subset of the site's rows with weights it cannot tell from 0 or 1 where the request is linear:
the training rows, the rows outside a fold, one scanner's rows; the positives and the negatives
among them in a first-round logistic fit (the gradient at equal coefficients is a sum over each
class); the rows of a categorical level (its indicator weights the rows 0 or 1). Any linear
combination of such sums weights the rows by a vector in the span of those subsets' indicators.
The ledger keeps every subset the site has released in this study and refuses a release after
which that span would hold a nonzero vector supported on fewer than the minimum patients: a sum
over them, however many replies it takes to compute.

The check is exact and cheap: the rows fall into cells (rows in exactly the same subsets), a
vector of the span is constant on each cell, and a support of fewer than the minimum can only be
made of cells smaller than it. The span's vectors that vanish on every larger cell form a small
space; where it is empty, nothing can be isolated; otherwise each group of small cells under the
minimum is tried (one of those vectors vanishes outside the group exactly when dropping the
group's cells lowers that space's rank).

The ledger lives in the study's folder (a restarted or repeated run of the same study is checked
against everything sent before). A refused release records nothing, and the phase answers with an
error naming the rule. The rows are named by their case ids, which never leave the site. The
minimum is the site's own (``min_patients`` in its site config, default
:data:`common.payloads.MIN_ROWS_SENT`): the coordinator cannot lower it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from common.errors import MyeloFedError
from common.payloads import MIN_ROWS_SENT
from common.provenance import atomic_write_json

LEDGER_FILE = "release_ledger.json"

#: The most groups of small cells tried one by one before a release is refused unchecked.
MAX_GROUPS_TRIED = 20_000


class ReleaseRefused(MyeloFedError):
    """A sum this site was asked for would, with what it sent before, isolate too few patients."""


def release(folder: Path, what: str, rows: Sequence[str], subsets: Sequence[npt.ArrayLike],
            min_rows: int = MIN_ROWS_SENT) -> None:
    """Record that sums over ``subsets`` (boolean masks over ``rows``) are about to leave, or
    raise :class:`ReleaseRefused` (recording nothing) if, with every subset released before in
    this study, some combination of the sums would be over 1 to ``min_rows - 1`` patients.
    ``what`` names the reply in the reason."""
    rows = [str(r) for r in rows]
    if len(set(rows)) != len(rows):
        raise ReleaseRefused(f"{what}: the rows' case ids are not unique, so the release ledger "
                             "cannot follow them; nothing is sent")
    path = Path(folder) / LEDGER_FILE
    released = _load(path)
    new = {tuple(sorted(r for r, inside in zip(rows, np.asarray(mask, dtype=bool), strict=True)
                        if inside)) for mask in subsets}
    everything = released | {s for s in new if s}
    if not isolable(everything, min_rows):
        if everything != released or not path.exists():
            _save(path, everything)
        return
    # the reason names no count: it leaves the site
    raise ReleaseRefused(
        f"{what}: with the sums this site has already sent in this study, these would let the "
        f"coordinator compute a sum over fewer than {min_rows} patients (by differencing sums "
        "over nearly the same rows); nothing is sent")


def crossed(n: int, groupings: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The row masks a linear request splits a sum over ``n`` rows into: all of them, then each
    level of each grouping in turn crossed with every mask before it (a logistic fit's first
    round splits by label; the nomogram's indicators by clinical level, and level x label)."""
    out = [np.ones(n, dtype=bool)]
    for values in groupings:
        out += [part & (values == v) for part in list(out) for v in np.unique(values)]
    return out


def scanner_subsets(batch: np.ndarray, levels: Sequence[np.ndarray],
                    only: Sequence[str] | None = None) -> list[np.ndarray]:
    """ComBat's subsets: each scanner's rows (of ``only`` these scanners), and each level of each
    categorical covariate within it (its design is additive: the covariates are not crossed in
    the sums of features). Without ``only`` (the design's round, whose ``X'X`` counts the rows
    of every two covariates' levels together, over all the site's scanners), each crossing of
    two covariates' levels too."""
    subsets = []
    for name in sorted(set(batch.tolist())) if only is None else only:
        rows = batch == name
        subsets += [rows, *(rows & (values == v) for values in levels
                            for v in np.unique(values))]
    if only is None:
        for first, second in itertools.combinations(levels, 2):
            subsets += crossed(len(batch), [first, second])
    return subsets


def isolable(subsets: set[tuple[str, ...]], min_rows: int) -> bool:
    """Whether the span of the indicators of ``subsets`` holds a nonzero vector supported on 1 to
    ``min_rows - 1`` rows (or the check gave up: then True)."""
    if not subsets:
        return False
    members = sorted({r for s in subsets for r in s})
    index = {r: i for i, r in enumerate(members)}
    a = np.zeros((len(subsets), len(members)))
    for k, subset in enumerate(sorted(subsets)):
        a[k, [index[r] for r in subset]] = 1.0
    cells, sizes = np.unique(a, axis=1, return_counts=True)
    small = np.flatnonzero(sizes < min_rows)
    if not len(small):
        return False
    # the span's vectors that vanish on every large cell: w'A with w'A_large = 0, seen on the
    # small cells (a basis of them, as rows)
    large = np.flatnonzero(sizes >= min_rows)
    kernel = _left_null(cells[:, large]) if len(large) else np.eye(len(cells))
    vanishing = _row_basis(kernel @ cells[:, small])
    d = len(vanishing)
    if d == 0:
        return False
    # a group of small cells can carry one of them exactly when dropping it lowers the rank
    order = np.argsort(sizes[small], kind="stable")
    tried = 0
    for size in range(1, len(small) + 1):
        for group in itertools.combinations(order, size):
            if sum(int(sizes[small[c]]) for c in group) >= min_rows:
                continue
            tried += 1
            rest = np.delete(vanishing, list(group), axis=1)
            if tried > MAX_GROUPS_TRIED or np.linalg.matrix_rank(rest, tol=_TOLERANCE) < d:
                return True
        if sum(np.sort(sizes[small])[:size + 1]) >= min_rows:
            break
    return False


#: Singular values under this are zero: the matrices hold 0/1 indicators and orthonormal
#: combinations of them, so their nonzero singular values are far above it.
_TOLERANCE = 1e-9


def _left_null(m: np.ndarray) -> np.ndarray:
    """A basis (rows) of the vectors w with w'm = 0."""
    u, s, _ = np.linalg.svd(m, full_matrices=True)
    return u[:, int(np.sum(s > _TOLERANCE)):].T


def _row_basis(m: np.ndarray) -> np.ndarray:
    """An orthonormal basis (rows) of the row space of ``m``."""
    if m.size == 0:
        return np.zeros((0, m.shape[1]))
    _, s, vt = np.linalg.svd(m, full_matrices=False)
    return vt[:int(np.sum(s > _TOLERANCE))]


def _load(path: Path) -> set[tuple[str, ...]]:
    """The subsets released so far (as case ids)."""
    if not path.exists():
        return set()
    try:
        subsets = json.loads(path.read_text())["subsets"]
        return {tuple(sorted(str(r) for r in s)) for s in subsets}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReleaseRefused(f"the release ledger {path} cannot be read ({exc!r}): no sum "
                             "leaves this site until it is restored or the study's folder is "
                             "reset") from exc


def _save(path: Path, released: set[tuple[str, ...]]) -> None:
    atomic_write_json(path, {"subsets": sorted(released)})
