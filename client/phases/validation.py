"""The validation: every model the coordinator sends, scored on this site's test rows; metrics
back (and into the site's own report), never a per-patient score."""

from __future__ import annotations

import json

from client.phases.nomogram import nomogram_design
from client.report import record_evaluation
from client.scoring import metrics_of, paired_comparisons
from client.workspace import feature_columns, split_table
from common.messages import EvaluateRequest
from common.metrics.tables import releasable
from common.payloads import ModelMetrics, clinical_terms, released
from common.protocol import StudyProtocol, TaskKind
from common.selection.model import LinearModel
from common.site_config import SiteConfig


def evaluate_request(site: SiteConfig, protocol: StudyProtocol, request: EvaluateRequest
                     ) -> ModelMetrics:
    """:func:`evaluate_models` of an evaluation request (each model cut at its threshold)."""
    models, radiomics = request.named()
    study = request.study
    thresholds = (dict(zip(study.models or (), study.thresholds, strict=True))
                  if study.thresholds else None)
    return evaluate_models(site, protocol, bool(study.harmonized), models, radiomics or None,
                           thresholds, study.seed if study.seed is not None else 0)


def evaluate_models(site: SiteConfig, protocol: StudyProtocol, harmonized: bool,
                    models: dict[str, LinearModel],
                    radiomics: dict[str, LinearModel] | None = None,
                    thresholds: dict[str, float] | None = None, seed: int = 0) -> ModelMetrics:
    """Each model's metrics on this site's test rows (as they may leave the site:
    :func:`common.metrics.tables.releasable`), and DeLong's test of the first model (the
    federated one) against each other; a nomogram (named in ``radiomics``, with the radiomics
    model whose score it takes) on its design. ``thresholds``: each model's risk cut-off, fixed
    on its training data (default 0.5)."""
    test = split_table(site, protocol, harmonized, "test")
    names = feature_columns(test, protocol)
    x = test[names].to_numpy(float)
    y = test[protocol.task.label_column].to_numpy(float)
    scores = {name: model.score(nomogram_design(test, protocol, x, [radiomics[name]])
                                if radiomics and name in radiomics else x)
              for name, model in models.items()}
    table = {name: metrics_of(protocol, y, score, (thresholds or {}).get(name, 0.5), seed)
             for name, score in scores.items()}
    classification = protocol.task.kind is TaskKind.CLASSIFICATION
    comparisons = (paired_comparisons(y, scores, next(iter(scores)))
                   if classification and scores else {})
    positives = int(y.sum()) if classification else 0
    content = {"models": table, "comparisons": comparisons}
    # what leaves the site: no confusion matrix with a cell under the minimum; the site's own
    # report keeps the whole table
    sent = {"models": {name: releasable(row, protocol.validation.min_count)
                       for name, row in table.items()}, "comparisons": comparisons}
    terms = {name: {"intercept": float(model.beta[0]), "coefficients": (
        dict(zip(["radiomics score", *clinical_terms(protocol)], model.beta[1:].tolist(),
                 strict=True))
        if radiomics and name in radiomics else
        {names[i]: float(c) for i, c in zip(model.features, model.beta[1:], strict=True)
         if c != 0})}
        for name, model in models.items()}
    record_evaluation(site, protocol, "nomogram" if radiomics else
                      ("harmonized" if harmonized else "raw"), content, y, scores, terms)
    return ModelMetrics(site.site_name, released(len(y), site.min_patients),
                        released(positives, site.min_patients), json.dumps(sent))
