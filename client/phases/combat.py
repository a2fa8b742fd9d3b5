"""Phase 3, federated ComBat: the site's halves of d-ComBat's rounds on its training rows, then
the fitted model applied to all of its rows (kept here). Every round's sums (over each scanner's
rows, split by the design's categorical covariates) are entered in the site's release ledger
(:mod:`client.ledger`) before they leave."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from client.ledger import release, scanner_subsets
from client.workspace import (
    HARMONIZED_FILE,
    PREPARED_FILE,
    feature_columns,
    load_study_table,
    study_dir,
)
from common.errors import HarmonizationError
from common.protocol import StudyProtocol, TaskKind
from common.provenance import atomic_write_parquet
from common.site_config import SiteConfig
from harmonization.combat.design import CombatOptions, Design
from harmonization.combat.eb import BatchAdjustment, estimate_batch_adjustment
from harmonization.combat.model import CombatModel
from harmonization.combat.moments import (
    DesignMoments,
    LocationFit,
    ResidualMoments,
    StackedMoments,
    site_batch_moments,
    site_design_moments,
    site_residual_moments,
    standardize,
)
from harmonization.messages import CombatRequest


def combat_inputs(site: SiteConfig, protocol: StudyProtocol, split: str | None = "train"
                  ) -> tuple[np.ndarray, list[str], dict[str, list[object]], pd.DataFrame]:
    """Features, batches and covariates of this site's rows (one split, or all). The training
    rows carry the label as a covariate when the protocol protects the outcome (0/1 for
    classification, the value for regression); rows read to be harmonized never do."""
    table = load_study_table(site, protocol, PREPARED_FILE)
    if split is not None:
        table = table[table["split"] == split].reset_index(drop=True)
    names = feature_columns(table, protocol)
    covariates = {c: table[c].tolist() for c in protocol.covariates.columns}
    if split == "train" and protocol.covariates.protect_outcome:
        label = table[protocol.task.label_column]
        covariates[protocol.task.label_column] = (
            label.astype(int).tolist() if protocol.task.kind is TaskKind.CLASSIFICATION
            else label.astype(float).tolist())
    return table[names].to_numpy(float), table["batch"].astype(str).tolist(), covariates, table


def design_moments(site: SiteConfig, protocol: StudyProtocol, request: CombatRequest
                   ) -> DesignMoments:
    """Round 1: the design's moments over this site's training rows."""
    design, options = request.design()
    y, batch, covariates, table = combat_inputs(site, protocol)
    # the site's own floor holds whatever the study asks: the coordinator cannot lower it
    floor = dataclasses.replace(options, min_cell=max(options.min_cell, site.min_patients))
    moments = site_design_moments(y, batch, covariates, design, floor, site.site_name)
    record_release(site, protocol, table, batch, covariates, design, "ComBat's design moments")
    return moments


def residual_moments(site: SiteConfig, protocol: StudyProtocol, request: CombatRequest
                     ) -> ResidualMoments:
    """Round 2: the residuals' sums of squares around the pooled location fit."""
    design, _ = request.design()
    if request.fit is None:
        raise HarmonizationError("ComBat round 2: the request carries no location fit")
    y, batch, covariates, table = combat_inputs(site, protocol)
    moments = site_residual_moments(y, batch, covariates, design, request.fit)
    record_release(site, protocol, table, batch, covariates, design,
                   "ComBat's residual moments")
    return moments


def shared_moments(site: SiteConfig, protocol: StudyProtocol, request: CombatRequest
                   ) -> StackedMoments:
    """Round 3, only for batches this site shares with another: their moments."""
    design, _ = request.design()
    fit, var = request.pooled()
    shared = set(request.study.shared_batches or ())
    y, batch, covariates, table = combat_inputs(site, protocol)
    z = standardize(y, batch, covariates, design, fit, var.var)
    mine = [m for name, m in sorted(site_batch_moments(z, batch, design).items())
            if name in shared]
    record_release(site, protocol, table, batch, covariates, design, "ComBat's shared moments",
                   sorted(shared))
    return StackedMoments.of(mine, y.shape[1])


def apply(site: SiteConfig, protocol: StudyProtocol, request: CombatRequest) -> int:
    """The last round: the model as this site holds it, applied to all its rows; the number of
    rows harmonized."""
    design, options = request.design()
    fit, var = request.pooled()
    if request.shared is None:
        raise HarmonizationError("ComBat's last round: the request carries no adjustments")
    model = combat_model_at_site(site, protocol, design, options, fit, var.var,
                                 request.shared.unstack())
    return harmonize_site(site, protocol, model)


def combat_model_at_site(site: SiteConfig, protocol: StudyProtocol, design: Design,
                         options: CombatOptions, fit: LocationFit, var_pooled: np.ndarray,
                         shared: dict[str, BatchAdjustment]) -> CombatModel:
    """The fitted model as this site holds it: the server's pooled estimates, the adjustments of
    shared batches from the server, and its own batches' EB computed here from its rows."""
    y, batch, covariates, _ = combat_inputs(site, protocol)
    z = standardize(y, batch, covariates, design, fit, var_pooled)
    adjustments = dict(shared)
    for name, moments in site_batch_moments(z, batch, design).items():
        if name not in adjustments:
            adjustments[name] = estimate_batch_adjustment(moments, options)
    n_features = y.shape[1]
    gamma = np.stack([adjustments[b].gamma if b in adjustments else np.full(n_features, np.nan)
                      for b in design.batches])
    delta = np.stack([adjustments[b].delta if b in adjustments else np.full(n_features, np.nan)
                      for b in design.batches])
    return CombatModel(design, options, fit.beta, fit.grand_mean, var_pooled, gamma, delta,
                       fit.batch_counts)


def harmonize_site(site: SiteConfig, protocol: StudyProtocol, model: CombatModel) -> int:
    """Apply the model to all of this site's rows (train and test); keep them here."""
    y, batch, covariates, table = combat_inputs(site, protocol, split=None)
    unfitted = sorted({b for b in batch if b not in model.design.batches
                       or np.isnan(model.gamma[model.design.batches.index(b)]).any()})
    if unfitted:
        raise HarmonizationError(f"scanner(s) {unfitted} have test rows but no training rows "
                                 "at this site")
    table[feature_columns(table, protocol)] = model.transform(y, batch, covariates)
    atomic_write_parquet(study_dir(site, protocol) / HARMONIZED_FILE, table)
    return len(table)


def record_release(site: SiteConfig, protocol: StudyProtocol, table: pd.DataFrame,
                   batch: list[str], covariates: dict[str, list[object]], design: Design,
                   what: str, only: list[str] | None = None) -> None:
    """Enter a round's sums in the release ledger: over each scanner's training rows (of
    ``only`` these scanners) and over each level of the design's categorical covariates within
    it (the label among them when the outcome is protected in a classification). The
    protocol's other columns are not in the design, so no sum is split by them."""
    levels = [np.asarray([str(v) for v in covariates[c]]) for c, _ in design.categorical]
    release(study_dir(site, protocol), what, table["case_id"].astype(str).tolist(),
            scanner_subsets(np.asarray(batch), levels, only), site.min_patients)
