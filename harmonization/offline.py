"""ComBat on a whole table in one process (``myelofed harmonize``), and whether it worked.

The site halves run once per site and the server halves in-process (:func:`fit_combat`, the same
calls the federated study makes through messages); the table is then harmonized and its site
effect (:func:`site_effect`) measured before and after, on the features less the preserved
covariates' effects, so that a difference in case mix between the batches is not counted as a
scanner effect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from harmonization.combat.design import CombatOptions, Covariates, Design
from harmonization.combat.model import CombatModel, SiteTable, fit_combat
from harmonization.diagnostics import SiteEffect, site_effect

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class OfflineCombat:
    """A table harmonized in one process, with its site effect before and after."""

    model: CombatModel
    harmonized: FloatArray         # (n_samples, n_features), the table's rows harmonized
    residual_before: FloatArray    # (n_samples, n_features): features less the covariates' part
    residual_after: FloatArray     # (n_samples, n_features): harmonized, less the same part
    before: SiteEffect
    after: SiteEffect

    @property
    def design(self) -> Design:
        return self.model.design


def harmonize_offline(y: FloatArray, batch: Sequence[str], covariates: Covariates,
                      categorical: Sequence[str], continuous: Sequence[str],
                      site_rows: Mapping[str, Sequence[int]], options: CombatOptions
                      ) -> OfflineCombat:
    """Fit ComBat on ``y`` ((n_samples, n_features), every row a case of batch ``batch[i]``)
    with one site half per entry of ``site_rows`` (site name -> its row indices, in the order
    given), harmonize every row and test the site effect before and after.

    Raises :class:`common.errors.HarmonizationError` (naming the batch, column or level) when
    ComBat cannot be fitted as asked.
    """
    design = Design.from_values(batch, covariates, categorical, continuous, options.ref_batch)
    sites = [SiteTable(name, y[list(rows)], [batch[i] for i in rows],
                       {c: [v[i] for i in rows] for c, v in covariates.items()})
             for name, rows in site_rows.items()]
    model = fit_combat(sites, design, options)
    harmonized = model.transform(y, batch, covariates)
    covariate_part = (design.matrix(batch, covariates)[:, design.n_batch:]
                      @ model.beta[design.n_batch:])
    residual_before, residual_after = y - covariate_part, harmonized - covariate_part
    return OfflineCombat(model, harmonized, residual_before, residual_after,
                         site_effect(residual_before, batch), site_effect(residual_after, batch))
