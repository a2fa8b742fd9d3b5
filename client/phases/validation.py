"""The validation: every model the coordinator sends, scored on this site's test rows; metrics
back (and into the site's own report), never a per-patient score."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from client.folds import split_state
from client.phases.nomogram import nomogram_design
from client.phases.radiomics import model_rows, rows_of
from client.report import record_evaluation
from client.scoring import metrics_of, paired_comparisons, survival_metrics_of
from client.workspace import feature_columns, split_table
from common.errors import MyeloFedError
from common.messages import EvaluateRequest
from common.metrics.survival import baseline_survival
from common.metrics.tables import releasable
from common.payloads import (
    NOMOGRAM_L2,
    NOMOGRAM_SITE_UPDATED,
    SITE_UPDATED,
    ModelMetrics,
    clinical_terms,
    evaluated_models,
    loss_of,
    released,
)
from common.protocol import StudyProtocol, TaskKind
from common.selection.model import LinearModel
from common.selection.pooled import fit_pooled
from common.selection.terms import assign_folds
from common.selection.updating import candidates, penalized_fit, update_at_site
from common.site_config import SiteConfig


def evaluate_request(site: SiteConfig, protocol: StudyProtocol, request: EvaluateRequest
                     ) -> ModelMetrics:
    """:func:`evaluate_models` of an evaluation request (each model cut at its threshold)."""
    models, radiomics = request.named()
    study = request.study
    thresholds = (dict(zip(study.models or (), study.thresholds, strict=True))
                  if study.thresholds else None)
    return evaluate_models(site, protocol, bool(study.harmonized), models, radiomics or None,
                           thresholds, study.seed if study.seed is not None else 0,
                           bool(study.site_update), study.split(protocol))


@dataclass(frozen=True)
class LocalUpdate:
    """The federated model as this site updated it, which candidate its cross-validation
    chose, every candidate's held-out deviance, and the training prevalence (the updated
    model's risk cut-off)."""
    model: LinearModel
    choice: str
    deviance: dict[str, float]
    prevalence: float

    def released(self) -> dict[str, object]:
        """What leaves the site of the update, for the coordinator's report: the candidate
        chosen (``federated`` where the update failed: the reason stays here) and each
        candidate's cross-validated deviance, a loss summed over the site's training rows
        (None where it could not be fitted)."""
        return {"choice": self.choice if self.choice in candidates() else "federated",
                "deviance": {k: v if math.isfinite(v) else None
                             for k, v in self.deviance.items()}}


def update_here(site: SiteConfig, protocol: StudyProtocol, harmonized: bool,
                federated: LinearModel, seed: int, repeat: int = 0) -> LocalUpdate:
    """The federated model updated on this site's training rows
    (:func:`common.selection.updating.update_at_site`), over the site's update folds
    (:func:`update_folds`); the candidate ``local`` is the site's local-only recipe refitted
    inside each fold. An update that cannot be fitted leaves the federated model, its choice
    saying why."""
    x, y, _ = model_rows(site, protocol, harmonized, "train", repeat)
    spec, loss = protocol.model, loss_of(protocol)

    def local(rows: np.ndarray, labels: np.ndarray) -> LinearModel:
        inner = plain_folds(labels, protocol, seed)
        model, _ = fit_pooled([(rows, labels, inner)], loss, spec.penalty, spec.screening_top_k,
                              spec.n_lambdas, spec.cv_folds, spec.lambda_rule)
        return model

    return _update(x, y, update_folds(y, protocol, seed, site.site_name), federated, loss, local)


def update_folds(y: np.ndarray, protocol: StudyProtocol, seed: int, site_name: str
                 ) -> np.ndarray:
    """The folds the site's update chooses by: ``model.cv_folds`` plain folds of the training
    rows (:func:`plain_folds`), seeded by the study seed and the site. Not
    the model's folds of privacy atoms (:func:`client.folds.site_folds`): the update's per-fold
    sums never leave the site (only each candidate's deviance summed over every training row),
    and at a small site an atom can hold every positive, leaving a fold with none to train
    on."""
    return plain_folds(y, protocol, split_state(seed, site_name))


def plain_folds(y: np.ndarray, protocol: StudyProtocol, seed: int) -> np.ndarray:
    """``model.cv_folds`` seeded folds of these rows, stratified by class (classification) or
    by event (survival: ``y`` holds times and events)."""
    survival = protocol.task.kind is TaskKind.SURVIVAL
    return assign_folds(y[:, 1] if survival else y, protocol.model.cv_folds, seed,
                        survival or protocol.task.kind is TaskKind.CLASSIFICATION)


def update_nomogram_here(site: SiteConfig, protocol: StudyProtocol, harmonized: bool,
                         federated: LinearModel, radiomics: LinearModel, seed: int,
                         repeat: int = 0) -> LocalUpdate:
    """The federated nomogram updated on this site's training rows, as :func:`update_here`
    does the radiomics model, on its design (``radiomics``' score and the clinical columns):
    the candidate ``local`` is the nomogram's own fit (the same ridge) on the site's rows."""
    table = split_table(site, protocol, harmonized, "train", repeat)
    x, y, _ = rows_of(table, protocol)
    folds = update_folds(y, protocol, seed, site.site_name)
    design = nomogram_design(table, protocol, x, [radiomics])
    p, loss = design.shape[1], loss_of(protocol)

    def local(rows: np.ndarray, labels: np.ndarray) -> LinearModel:
        beta = penalized_fit(rows, labels, loss, np.zeros(p), NOMOGRAM_L2 * len(labels))
        return LinearModel(np.arange(p), np.zeros(p), np.ones(p), beta)

    return _update(design, y, folds, federated, loss, local)


def _update(x: np.ndarray, y: np.ndarray, folds: np.ndarray, federated: LinearModel, loss: str,
            local: Callable[[np.ndarray, np.ndarray], LinearModel]) -> LocalUpdate:
    prevalence = float(y.mean()) if y.ndim == 1 else 0.5  # (a Cox model has no cut-off)
    try:
        update = update_at_site(x, y, folds, federated, loss, local)
    except MyeloFedError as exc:  # the site's other metrics are kept: the federated model
        return LocalUpdate(federated, f"federated (the update failed: {exc})", {}, prevalence)
    return LocalUpdate(update.model, update.choice, update.deviance, prevalence)


def evaluate_models(site: SiteConfig, protocol: StudyProtocol, harmonized: bool,
                    models: dict[str, LinearModel],
                    radiomics: dict[str, LinearModel] | None = None,
                    thresholds: dict[str, float] | None = None, seed: int = 0,
                    site_update: bool = False, repeat: int = 0) -> ModelMetrics:
    """Each model's metrics on this site's test rows (as they may leave the site:
    :func:`common.metrics.tables.releasable`), and DeLong's test of the first model (the
    federated one) against each other; a nomogram (named in ``radiomics``, with the radiomics
    model whose score it takes) on its design. ``thresholds``: each model's risk cut-off, fixed
    on its training data (default 0.5). With ``site_update`` (the request asks for it), the
    federated radiomics model updated on this site's rows (:func:`update_here`) is scored too,
    as ``site-updated``, or in a nomogram's evaluation the federated nomogram updated here
    (:func:`update_nomogram_here`), as ``nomogram site-updated``. ``repeat``: the study's
    split (``validation.repeats``) whose rows fit and score; the site's report keeps the
    first's."""
    update, updated = None, NOMOGRAM_SITE_UPDATED if radiomics else SITE_UPDATED
    survival = protocol.task.kind is TaskKind.SURVIVAL
    if evaluated_models(list(models), site_update, bool(radiomics)) != list(models):
        if radiomics:
            update = update_nomogram_here(site, protocol, harmonized, models["nomogram"],
                                          radiomics["nomogram"], seed, repeat)
            radiomics = {**radiomics, updated: radiomics["nomogram"]}
        else:
            update = update_here(site, protocol, harmonized, models["federated"], seed, repeat)
        models = {**models, updated: update.model}
        thresholds = {**(thresholds or {}), updated: update.prevalence}
    test = split_table(site, protocol, harmonized, "test", repeat)
    names = feature_columns(test, protocol)
    x, y, _ = rows_of(test, protocol)

    def scored(rows: pd.DataFrame, features: np.ndarray) -> dict[str, np.ndarray]:
        return {name: model.score(nomogram_design(rows, protocol, features, [radiomics[name]])
                                  if radiomics and name in radiomics else features)
                for name, model in models.items()}

    scores = scored(test, x)
    if survival:  # the censoring and the baseline hazard come from the site's training rows
        train = split_table(site, protocol, harmonized, "train", repeat)
        train_x, train_y, _ = rows_of(train, protocol)
        on_train = scored(train, train_x)
        table = {name: survival_metrics_of(protocol, y, score, train_y, on_train[name], seed)
                 for name, score in scores.items()}
    else:
        table = {name: metrics_of(protocol, y, score, (thresholds or {}).get(name, 0.5), seed)
                 for name, score in scores.items()}
    classification = protocol.task.kind is TaskKind.CLASSIFICATION
    comparisons = (paired_comparisons(y, scores, next(iter(scores)))
                   if classification and scores else {})
    # what the table's positives count: the class, or a survival task's events
    positives = int(y.sum()) if classification else int(y[:, 1].sum()) if survival else 0
    content = {"models": table, "comparisons": comparisons}
    # what leaves the site: no confusion matrix with a cell under the minimum; the site's own
    # report keeps the whole table
    sent: dict[str, object] = {
        "models": {name: releasable(row, protocol.validation.min_count)
                   for name, row in table.items()}, "comparisons": comparisons,
        **({"update": update.released()} if update is not None else {})}
    design = ["radiomics score", *clinical_terms(protocol)]  # a nomogram's columns
    terms = {name: {"intercept": float(model.beta[0]), "coefficients": {
        (design if radiomics and name in radiomics else names)[i]: float(c)
        for i, c in zip(model.features, model.beta[1:], strict=True)
        if c != 0 or (radiomics and name in radiomics)}}
        for name, model in models.items()}
    if survival:  # each model's baseline survival here (kept: the site's predicted survival)
        for name in models:
            terms[name]["baseline_survival"] = dict(zip(
                [f"{t:g}" for t in protocol.validation.times],
                baseline_survival(train_y[:, 0], train_y[:, 1], on_train[name],
                                  protocol.validation.times) or [], strict=False))
    if update is not None:  # which update the site's cross-validation chose, kept here
        terms[updated] |= {"choice": update.choice, "cv_deviance": update.deviance}
    if repeat == 0:
        record_evaluation(site, protocol, "nomogram" if radiomics else
                          ("harmonized" if harmonized else "raw"), content, y, scores, terms)
    return ModelMetrics(site.site_name, released(len(y), site.min_patients),
                        released(positives, site.min_patients), json.dumps(sent))
