"""Phase 4, the radiomics model: this site's comoments and local-only model, then its terms
(gradients and Hessians summed over its training rows) for every fit the coordinator steps."""

from __future__ import annotations

import numpy as np

from client.phases.nomogram import nomogram_rows
from client.workspace import feature_columns, split_table
from common.glm import ModelError
from common.messages import ModelTermsRequest
from common.payloads import MIN_ROWS_SENT, loss_of
from common.protocol import StudyProtocol
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
    return site_batch_terms(x, y, folds, request.request, loss_of(protocol), MIN_ROWS_SENT)
