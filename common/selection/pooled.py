"""Both halves of the penalized fits in one process, with every site's rows at hand: what the
federation computes, for a site's own local-only model and for tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from common.selection.batch import FitBatch, new_batch, update_by_site
from common.selection.model import LinearModel
from common.selection.screening import combine_comoments, screening_label, site_comoments
from common.selection.terms import site_batch_terms

IndexArray: TypeAlias = npt.NDArray[np.int64]  # feature indices, fold numbers


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


def fit_pooled(sites: Sequence[tuple[npt.ArrayLike, npt.ArrayLike, IndexArray]], loss: str,
               penalty: str, top_k: int, n_lambdas: int, folds: int, rule: str,
               min_rows: int = 1) -> tuple[LinearModel, FitBatch]:
    """Screening, the penalty path, cross-validation and the chosen model over ``sites`` (each
    ``(x, y, folds)``) in one process: what the federation computes, for a site's own
    local-only model and for tests."""
    moments = combine_comoments([site_comoments(x, screening_label(y, loss))
                                 for x, y, _ in sites])
    batch = run_in_process(new_batch([moments], loss, penalty, top_k, n_lambdas, folds),
                           sites, [list(range(len(sites)))], min_rows)
    return batch.model(0, rule), batch
