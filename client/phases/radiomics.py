"""Phase 4, the radiomics model: this site's comoments and local-only model, then its terms
(gradients and Hessians summed over its training rows) for every fit the coordinator steps.
Every sum is entered in the site's release ledger (:mod:`client.ledger`) before it leaves."""

from __future__ import annotations

import numpy as np

from client.ledger import release
from client.phases.nomogram import nomogram_rows
from client.workspace import feature_columns, split_table, study_dir
from common.glm import ModelError
from common.messages import ModelTermsRequest
from common.payloads import MIN_ROWS_SENT, loss_of
from common.protocol import StudyProtocol, TaskKind
from common.selection.model import LinearModel
from common.selection.pooled import fit_pooled
from common.selection.screening import Comoments, site_comoments
from common.selection.terms import BatchTerms, site_batch_terms
from common.site_config import SiteConfig


def model_rows(site: SiteConfig, protocol: StudyProtocol, harmonized: bool, split: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels and CV folds of one split, raw or after federated ComBat. Training rows
    are refused below :data:`MIN_ROWS_SENT`: their sums would come close to a patient's values."""
    table = split_table(site, protocol, harmonized, split)
    return (table[feature_columns(table, protocol)].to_numpy(float),
            table[protocol.task.label_column].to_numpy(float), table["fold"].to_numpy())


def model_summary(site: SiteConfig, protocol: StudyProtocol, harmonized: bool
                  ) -> tuple[Comoments, LinearModel | None]:
    """The first model round: this site's comoments over its training rows, and its local-only
    model (the same recipe on its own rows: the baseline that shows what federation adds; None
    when its rows cannot support one, e.g. too few of a class for the folds)."""
    x, y, folds = model_rows(site, protocol, harmonized, "train")
    record_release(site, protocol, harmonized, "the model's comoments",
                   [np.ones(len(y), dtype=bool)])
    spec = protocol.model
    try:
        local, _ = fit_pooled([(x, y, folds)], loss_of(protocol), spec.penalty,
                              spec.screening_top_k, spec.n_lambdas, spec.cv_folds,
                              spec.lambda_rule, MIN_ROWS_SENT)
    except ModelError:
        local = None
    return site_comoments(x, y), local


def model_terms(site: SiteConfig, protocol: StudyProtocol, request: ModelTermsRequest
                ) -> BatchTerms:
    """This site's terms for a batch of fits: of the radiomics model, or (the request carries
    radiomics models) of the nomogram on their scores and the clinical columns."""
    harmonized = bool(request.study.harmonized)
    if request.radiomics:
        x, y, folds = nomogram_rows(site, protocol, harmonized, "train",
                                    list(request.radiomics))
    else:
        x, y, folds = model_rows(site, protocol, harmonized, "train")
    terms = site_batch_terms(x, y, folds, request.request, loss_of(protocol), MIN_ROWS_SENT)
    left_out = sorted({int(f) for f in request.request.fit_fold})
    record_release(site, protocol, harmonized,
                   "the nomogram's terms" if request.radiomics else "the model's terms",
                   [folds != fold for fold in left_out], bool(request.radiomics))
    return terms


def record_release(site: SiteConfig, protocol: StudyProtocol, harmonized: bool, what: str,
                   subsets: list[np.ndarray], clinical: bool = False) -> None:
    """Enter sums over ``subsets`` of the training rows in the release ledger, with the parts
    that linear requests split them into: each class of a classification (its first-round sums
    are over each), and in the nomogram each level of a categorical clinical column and each
    level x class (their indicators weight rows 0 or 1)."""
    table = split_table(site, protocol, harmonized, "train")
    splits: list[np.ndarray] = [np.ones(len(table), dtype=bool)]
    if protocol.task.kind is TaskKind.CLASSIFICATION:
        label = table[protocol.task.label_column].to_numpy()
        splits += [label == v for v in np.unique(label)]
    if clinical:
        for column in protocol.model.clinical:
            if column in protocol.covariates.categorical:
                values = table[column].astype(str).to_numpy()
                splits += [part & (values == v) for part in list(splits)
                           for v in np.unique(values)]
    release(study_dir(site, protocol), what, table["case_id"].astype(str).tolist(),
            [subset & part for subset in subsets for part in splits], site.min_patients)
