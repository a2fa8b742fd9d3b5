"""Phase 3, federated ComBat: the site's halves of d-ComBat's rounds on its training rows (and,
with CovBat, of its rounds on their residuals), then the fitted model applied to all of its rows
(kept here). Every round's sums (over each scanner's rows, split by the design's categorical
covariates; CovBat's products over all the training rows) are entered in the site's release
ledger (:mod:`client.ledger`) before they leave."""

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
    tables_dir,
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
from harmonization.covbat import (
    CovbatModel,
    ResidualProducts,
    covbat_scores,
    score_design,
    score_options,
    site_residual_products,
)
from harmonization.diagnostics import SiteEffect, scanner_effect
from harmonization.messages import CombatRequest, HarmonizedRows


def combat_inputs(site: SiteConfig, protocol: StudyProtocol, split: str | None = "train",
                  repeat: int = 0
                  ) -> tuple[np.ndarray, list[str], dict[str, list[object]], pd.DataFrame]:
    """Features, batches and covariates of this site's rows (one split, or all; of the
    study's split ``repeat``). The training rows carry the label as a covariate when the
    protocol protects the outcome (0/1 for classification, the value for regression); rows
    read to be harmonized never do."""
    table = load_study_table(site, protocol, PREPARED_FILE, repeat)
    if split is not None:
        table = table[table["split"] == split].reset_index(drop=True)
    names = feature_columns(table, protocol)
    covariates = {c: table[c].tolist() for c in protocol.covariates.columns}
    if split == "train" and protocol.protects_outcome:
        label = table[protocol.task.label_column]
        covariates[protocol.task.label_column] = (
            label.astype(int).tolist() if protocol.task.kind is TaskKind.CLASSIFICATION
            else label.astype(float).tolist())
    return table[names].to_numpy(float), table["batch"].astype(str).tolist(), covariates, table


@dataclasses.dataclass(frozen=True)
class RoundRows:
    """The training rows a round works on: the features, or in CovBat's rounds on the scores
    the scores of their ComBat residuals along the request's axes; with their scanners,
    covariates, table, the design and options they are harmonized under, and in CovBat's rounds
    the features' ComBat as this site holds it (``combat``)."""
    y: np.ndarray
    batch: list[str]
    covariates: dict[str, list[object]]
    table: pd.DataFrame
    design: Design
    options: CombatOptions
    combat: CombatModel | None = None


def round_rows(site: SiteConfig, protocol: StudyProtocol, request: CombatRequest
               ) -> RoundRows:
    """What a round of ``request`` works on at this site (see :class:`RoundRows`): its
    training table is read once, and the features' ComBat built once from it."""
    design, options = request.design()
    y, batch, covariates, table = combat_inputs(site, protocol,
                                                repeat=request.study.split(protocol))
    rows = RoundRows(y, batch, covariates, table, design, options)
    if request.combat_fit is None and request.axes is None:  # ComBat's own rounds
        return rows
    fit, var, shared = request.combat()
    combat = combat_model_at_site(rows, fit, var.var, shared.unstack())
    if request.axes is None:  # CovBat's products: the features, with their ComBat
        return dataclasses.replace(rows, combat=combat)
    scores = covbat_scores(combat, request.axes, y, batch, covariates)
    return RoundRows(scores, batch, covariates, table, score_design(design),
                     score_options(options), combat)


def design_moments(site: SiteConfig, protocol: StudyProtocol, request: CombatRequest
                   ) -> DesignMoments:
    """Round 1: the design's moments over this site's training rows."""
    rows = round_rows(site, protocol, request)
    # the site's own floor holds whatever the study asks: the coordinator cannot lower it
    floor = dataclasses.replace(rows.options, min_cell=max(rows.options.min_cell,
                                                           site.min_patients))
    moments = site_design_moments(rows.y, rows.batch, rows.covariates, rows.design, floor,
                                  site.site_name)
    record_release(site, protocol, rows, f"{_stage(request)}'s design moments")
    return moments


def residual_moments(site: SiteConfig, protocol: StudyProtocol, request: CombatRequest
                     ) -> ResidualMoments:
    """Round 2: the residuals' sums of squares around the pooled location fit."""
    if request.fit is None:
        raise HarmonizationError(f"{_stage(request)} round 2: the request carries no location "
                                 "fit")
    rows = round_rows(site, protocol, request)
    moments = site_residual_moments(rows.y, rows.batch, rows.covariates, rows.design,
                                    request.fit)
    record_release(site, protocol, rows, f"{_stage(request)}'s residual moments")
    return moments


def shared_moments(site: SiteConfig, protocol: StudyProtocol, request: CombatRequest
                   ) -> StackedMoments:
    """Round 3, only for batches this site shares with another: their moments."""
    fit, var = request.pooled()
    shared = set(request.study.shared_batches or ())
    rows = round_rows(site, protocol, request)
    z = standardize(rows.y, rows.batch, rows.covariates, rows.design, fit, var.var)
    mine = [m for name, m in sorted(site_batch_moments(z, rows.batch, rows.design).items())
            if name in shared]
    record_release(site, protocol, rows, f"{_stage(request)}'s shared moments", sorted(shared))
    return StackedMoments.of(mine, rows.y.shape[1])


def residual_products(site: SiteConfig, protocol: StudyProtocol, request: CombatRequest
                      ) -> ResidualProducts:
    """CovBat's first round: the sums of this site's training rows' ComBat residuals and of
    their outer products (over all its training rows: one sum, entered in the ledger as
    such)."""
    rows = round_rows(site, protocol, request)
    if rows.combat is None:
        raise HarmonizationError("CovBat's first round: the request carries no fitted ComBat")
    adjusted, _, _ = rows.combat.adjusted(rows.y, rows.batch, rows.covariates)
    release(study_dir(site, protocol), "CovBat's residual products",
            rows.table["case_id"].astype(str).tolist(),
            [np.ones(len(rows.table), dtype=bool)], site.min_patients)
    return site_residual_products(adjusted)


def apply(site: SiteConfig, protocol: StudyProtocol, request: CombatRequest) -> HarmonizedRows:
    """The last round: the model as this site holds it (ComBat, or ComBat then CovBat),
    applied to all its rows; the number of rows harmonized, with the diagnostic of the site's
    own scanners before and after (where each has at least ``min_patients`` training rows)."""
    fit, var = request.pooled()
    if request.shared is None:
        raise HarmonizationError("ComBat's last round: the request carries no adjustments")
    rows = round_rows(site, protocol, request)
    model = combat_model_at_site(rows, fit, var.var, request.shared.unstack())
    harmonized = harmonize_site(site, protocol, CovbatModel(rows.combat, request.axes, model)
                                if rows.combat is not None and request.axes is not None
                                else model, request.study.split(protocol))
    # the training rows as prepared are the round's own; as harmonized, those just written
    before, after = (scanner_diagnostic(table, protocol, site.min_patients)
                     for table in (rows.table, harmonized))
    if before is None or after is None:
        return HarmonizedRows(len(harmonized))
    return HarmonizedRows(len(harmonized), before.tested, before.significant,
                          after.significant)


def scanner_diagnostic(table: pd.DataFrame, protocol: StudyProtocol, min_rows: int = 1
                       ) -> SiteEffect | None:
    """Which features still differ between the site's own scanners, on its training rows
    (Kruskal-Wallis p < 0.05 on each feature less its class mean:
    :func:`harmonization.diagnostics.scanner_effect`); None with one scanner, or one of fewer
    than ``min_rows`` training rows."""
    train = table[table["split"] == "train"]
    batch = train["batch"].astype(str)
    counts = batch.value_counts()
    if len(counts) < 2 or counts.min() < min_rows:
        return None
    label = (train[protocol.task.label_column].to_numpy()
             if protocol.task.kind is TaskKind.CLASSIFICATION else None)
    return scanner_effect(train[feature_columns(train, protocol)].to_numpy(float),
                          batch.tolist(), label)


def combat_model_at_site(rows: RoundRows, fit: LocationFit, var_pooled: np.ndarray,
                         shared: dict[str, BatchAdjustment]) -> CombatModel:
    """The fitted model as this site holds it: the server's pooled estimates, the adjustments of
    shared batches from the server, and its own batches' computed here from its training
    ``rows``."""
    design = rows.design
    z = standardize(rows.y, rows.batch, rows.covariates, design, fit, var_pooled)
    adjustments = dict(shared)
    for name, moments in site_batch_moments(z, rows.batch, design).items():
        if name not in adjustments:
            adjustments[name] = estimate_batch_adjustment(moments, rows.options)
    n_features = rows.y.shape[1]
    gamma = np.stack([adjustments[b].gamma if b in adjustments else np.full(n_features, np.nan)
                      for b in design.batches])
    delta = np.stack([adjustments[b].delta if b in adjustments else np.full(n_features, np.nan)
                      for b in design.batches])
    return CombatModel(design, rows.options, fit.beta, fit.grand_mean, var_pooled, gamma, delta,
                       fit.batch_counts)


def harmonize_site(site: SiteConfig, protocol: StudyProtocol,
                   model: CombatModel | CovbatModel, repeat: int = 0) -> pd.DataFrame:
    """Apply the model to all of this site's rows (train and test, of split ``repeat``); keep
    them here, and return them."""
    y, batch, covariates, table = combat_inputs(site, protocol, split=None, repeat=repeat)
    unfitted = sorted(set(batch) - model.fitted_batches())
    if unfitted:
        raise HarmonizationError(f"scanner(s) {unfitted} have test rows but no training rows "
                                 "at this site")
    table[feature_columns(table, protocol)] = model.transform(y, batch, covariates)
    atomic_write_parquet(tables_dir(site, protocol, repeat) / HARMONIZED_FILE, table)
    return table


def _stage(request: CombatRequest) -> str:
    return "ComBat" if request.axes is None else "CovBat"


def record_release(site: SiteConfig, protocol: StudyProtocol, rows: RoundRows, what: str,
                   only: list[str] | None = None) -> None:
    """Enter a round's sums in the release ledger: over each scanner's training rows (of
    ``only`` these scanners) and over each level of the design's categorical covariates within
    it (the label among them when the outcome is protected in a classification). The
    protocol's other columns are not in the design, so no sum is split by them."""
    levels = [np.asarray([str(v) for v in rows.covariates[c]]) for c, _ in rows.design.categorical]
    release(study_dir(site, protocol), what, rows.table["case_id"].astype(str).tolist(),
            scanner_subsets(np.asarray(rows.batch), levels, only), site.min_patients)
