"""Phase 4, the radiomics model: this site's comoments and local-only model, then its terms
(gradients and Hessians summed over its training rows) for every fit the coordinator steps.
Every sum is entered in the site's release ledger (:mod:`client.ledger`) before it leaves."""

from __future__ import annotations

import numpy as np
import pandas as pd

from client.ledger import crossed, release
from client.phases.nomogram import nomogram_design
from client.workspace import feature_columns, split_table, study_dir
from common.glm import ModelError
from common.messages import ModelTermsRequest
from common.payloads import MIN_ROWS_SENT, loss_of
from common.protocol import StudyProtocol, TaskKind
from common.selection.model import LinearModel
from common.selection.pooled import fit_pooled
from common.selection.screening import Comoments, screening_label, site_comoments
from common.selection.terms import BatchTerms, site_batch_terms
from common.site_config import SiteConfig


def model_rows(site: SiteConfig, protocol: StudyProtocol, harmonized: bool, split: str,
               repeat: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels and CV folds of one split (of the study's split ``repeat``), raw or
    after federated ComBat. Training rows are refused below :data:`MIN_ROWS_SENT`: their sums
    would come close to a patient's values."""
    return rows_of(split_table(site, protocol, harmonized, split, repeat), protocol)


def rows_of(table: pd.DataFrame, protocol: StudyProtocol
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A study table's features, labels (a survival task's (n, 2) times and events) and CV
    folds."""
    columns = label_columns(protocol)
    labels = table[columns].to_numpy(float) if len(columns) > 1 else \
        table[columns[0]].to_numpy(float)
    return table[feature_columns(table, protocol)].to_numpy(float), labels, \
        table["fold"].to_numpy()


def label_columns(protocol: StudyProtocol) -> list[str]:
    """The label column, and a survival task's event column after it."""
    task = protocol.task
    return [task.label_column, *([task.event_column] if task.event_column else [])]


def model_summary(site: SiteConfig, protocol: StudyProtocol, harmonized: bool, repeat: int = 0
                  ) -> tuple[Comoments, LinearModel | None]:
    """The first model round: this site's comoments over its training rows (of the study's
    split ``repeat``), and its local-only model (the same recipe on its own rows: the baseline
    that shows what federation adds; None when its rows cannot support one, e.g. too few of a
    class for the folds)."""
    table = split_table(site, protocol, harmonized, "train", repeat)
    x, y, folds = rows_of(table, protocol)
    record_release(table, site, protocol, "the model's comoments",
                   [np.ones(len(y), dtype=bool)])
    spec = protocol.model
    try:
        local, _ = fit_pooled([(x, y, folds)], loss_of(protocol), spec.penalty,
                              spec.screening_top_k, spec.n_lambdas, spec.cv_folds,
                              spec.lambda_rule, MIN_ROWS_SENT)
    except ModelError:
        local = None
    return site_comoments(x, screening_label(y, loss_of(protocol))), local


def model_terms(site: SiteConfig, protocol: StudyProtocol, request: ModelTermsRequest
                ) -> BatchTerms:
    """This site's terms for a batch of fits: of the radiomics model, or (the request carries
    radiomics models) of the nomogram on their scores and the clinical columns."""
    table = split_table(site, protocol, bool(request.study.harmonized), "train",
                        request.study.split(protocol))
    x, y, folds = rows_of(table, protocol)
    if request.radiomics:
        x = nomogram_design(table, protocol, x, list(request.radiomics))
    terms = site_batch_terms(x, y, folds, request.request, loss_of(protocol), MIN_ROWS_SENT)
    left_out = sorted({int(f) for f in request.request.fit_fold})
    record_release(table, site, protocol,
                   "the nomogram's terms" if request.radiomics else "the model's terms",
                   [folds != fold for fold in left_out], bool(request.radiomics))
    return terms


def record_release(table: pd.DataFrame, site: SiteConfig, protocol: StudyProtocol, what: str,
                   subsets: list[np.ndarray], clinical: bool = False) -> None:
    """Enter sums over ``subsets`` of the training rows (``table``) in the release ledger, with
    the parts that linear requests split them into: each class of a classification (its
    first-round sums are over each), and in the nomogram each level of a categorical clinical
    column and each level x class (their indicators weight rows 0 or 1)."""
    groupings = []
    if protocol.task.kind is TaskKind.CLASSIFICATION:
        groupings.append(table[protocol.task.label_column].to_numpy())
    if clinical:
        groupings += [table[c].astype(str).to_numpy() for c in protocol.model.clinical
                      if c in protocol.covariates.categorical]
    parts = crossed(len(table), groupings)
    release(study_dir(site, protocol), what, table["case_id"].astype(str).tolist(),
            [subset & part for subset in subsets for part in parts], site.min_patients)
