"""Phase 4, the radiomics model: the sites' comoments and local-only models; screening, the
penalty path and federated cross-validation of every training set at once (all sites, and each
site left out), fitted exactly from summed gradients and Hessians, one Newton round a step; then
every site scores the federated model, the model trained without it and every local model (the
validation, :mod:`server.phases.validation`). Then the nomogram (:mod:`server.phases.nomogram`)
when the protocol names clinical factors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from common.messages import EvaluateRequest, MessageType, ModelTermsRequest, StudyRequest
from common.payloads import ModelMetrics, loss_of
from common.records import pack_request
from common.selection.batch import FitBatch, new_batch, update_by_site
from common.selection.model import LinearModel
from common.selection.screening import Comoments, combine_comoments
from common.selection.terms import BatchRequest, BatchTerms
from server.phases.validation import pool_sites, site_results
from server.rounds import Records, Transport, collect, exchange, study_config
from server.study import Progress, StudySettings, require_sites


def run_model(transport: Transport, nodes: dict[int, str], feature_names: Sequence[str],
              settings: StudySettings, harmonized: bool,
              progress: Callable[[str], None] = lambda _: None,
              site_update: frozenset[str] = frozenset()
              ) -> tuple[dict[str, LinearModel], dict[str, list[str]], dict[str, object]]:
    """Phase 4 on raw or harmonized features: the sites' comoments and local-only models; then
    screening, the penalty path and federated cross-validation of every training set at once
    (all sites, and each site left out), one Newton round a step; then every site's test
    metrics of the federated model, the model trained without it and every site's local model
    (and, at the ``site_update`` sites, the federated model updated on their own rows).
    A site lost mid-fit is named and the fits restart without it (every fit needs every one of
    its sites in every step). Returns the chosen model and the sites of each training set, and
    the phase's report."""
    spec = settings.protocol.model
    f = len(feature_names)

    study = study_config(settings, harmonized=harmonized)
    summary_request = pack_request(StudyRequest(study))
    replies, failed = exchange(transport, nodes, MessageType.MODEL_SUMMARY,
                               lambda _: summary_request, settings)
    summaries = collect(replies, failed, "moments", Comoments,
                        {"mean": (f,), "m2": (f,), "cross": (f,)})
    local: dict[str, LinearModel] = {}
    for site, reply in replies.items():  # a malformed local model excludes its site, named
        if site in summaries and "local.meta" in reply.content:
            got = collect({site: reply}, failed, "local", LinearModel)
            if site in got and np.max(got[site].features, initial=-1) >= f:
                failed[site] = "local model: a feature index beyond the study's features"
                got = {}
            if site in got:
                local[site] = got[site]
            else:
                del summaries[site]
    while True:
        require_sites(summaries, failed, settings, "model comoments")
        nodes = {n: s for n, s in nodes.items() if s in summaries}
        sites = sorted(summaries)
        sets = {"federated": sites}
        if len(sites) >= 2:
            sets |= {f"without {s}": [o for o in sites if o != s] for s in sites}
        names = list(sets)
        pooled = {name: combine_comoments([summaries[s] for s in sets[name]]) for name in names}
        batch = new_batch([pooled[name] for name in names], loss_of(settings.protocol),
                          spec.penalty, spec.screening_top_k, spec.n_lambdas, spec.cv_folds)
        progress(f"  {len(batch.fits)} fits: {len(names)} training set(s) x "
                 f"{spec.n_lambdas} penalties x {spec.cv_folds + 1} folds")
        lost = run_batch(transport, nodes, batch, [set(sets[n]) for n in names], settings,
                         lambda request: pack_request(ModelTermsRequest(study, request)),
                         failed, progress)
        if not lost:
            break
        for site in lost:
            summaries.pop(site, None)
    models = {name: batch.model(t, spec.lambda_rule) for t, name in enumerate(names)}

    def to_evaluate(site: str) -> list[tuple[str, LinearModel]]:
        chosen = [("federated", models["federated"])]
        if f"without {site}" in models:
            chosen.append(("leave-site-out", models[f"without {site}"]))
        return chosen + [(f"local {s}", m) for s, m in sorted(local.items())]

    # each model's risk cut-off is its training set's prevalence (Youden's optimum for a
    # calibrated risk; see common.metrics), known here from the pooled label means
    prevalence = {name: float(pooled[name].y_mean) for name in names}
    prevalence |= {f"local {s}": float(summaries[s].y_mean) for s in local}

    def evaluation(node: int) -> Records:
        site = nodes[node]
        chosen = to_evaluate(site)
        cut = [prevalence[f"without {site}" if n == "leave-site-out" else n] for n, _ in chosen]
        return pack_request(EvaluateRequest(
            study_config(settings, harmonized=harmonized, models=tuple(n for n, _ in chosen),
                         thresholds=tuple(cut), seed=settings.seed,
                         site_update=site in site_update or None),
            tuple(m for _, m in chosen)))

    replies, more = exchange(transport, nodes, MessageType.MODEL_EVALUATE, evaluation, settings)
    failed.update(more)
    metrics = collect(replies, failed, "metrics", ModelMetrics)
    return models, sets, {
        "harmonized": harmonized, "loss": batch.loss, "penalty": batch.penalty,
        "lambda_rule": spec.lambda_rule, "rounds": batch.rounds,
        "training_sets": {name: set_report(batch, t, spec.lambda_rule, sets[name],
                                            feature_names)
                          | ({"prevalence": prevalence[name]} if batch.loss == "logistic" else {})
                          for t, name in enumerate(names)},
        "local_models": {s: model_report(m, feature_names) for s, m in sorted(local.items())},
        "sites": (results := site_results(metrics, failed)),
        "pooled": pool_sites(results, batch.loss),
        "failed": failed}


def run_batch(transport: Transport, nodes: dict[int, str], batch: FitBatch,
              members: list[set[str]], settings: StudySettings,
              ask: Callable[[BatchRequest], Records], failed: dict[str, str],
              progress: Progress) -> list[str]:
    """Drive every fit of ``batch`` to the end, one Newton round a step (``ask``: the request of
    a site's pending fits); the sites lost on the way (empty = done)."""
    while not batch.done:
        pending = batch.pending()
        mine = {site: [j for j in pending if site in members[batch.fits[j].set_index]]
                for site in nodes.values()}
        replies, more = exchange(
            transport, nodes, MessageType.MODEL_TERMS,
            lambda node, mine=mine: ask(batch.request(mine[nodes[node]])), settings)
        failed.update(more)
        width = batch.features.shape[1] + 1
        terms: dict[str, BatchTerms] = {}
        for site, reply in replies.items():
            j = len(mine[site])
            terms |= collect({site: reply}, failed, "terms", BatchTerms, {
                "n": (j,), "gradient": (j, width), "hessian": (j, width, width),
                "loss": (j,), "n_out": (j,), "loss_out": (j,)})
        lost = sorted(set(nodes.values()) - set(terms))
        if lost:
            return lost
        update_by_site(batch, pending, [(mine[s], terms[s]) for s in sorted(terms)])
        progress(f"  round {batch.rounds}: {len(pending)} fits stepped, "
                  f"{len(batch.pending())} still running")
    return []


def model_report(model: LinearModel, feature_names: Sequence[str]) -> dict[str, object]:
    """A model as the coordinator keeps it: feature names, standardization and coefficients."""
    return {"intercept": float(model.beta[0]),
            "features": [feature_names[i] for i in model.features],
            "mean": model.mean.tolist(), "sd": model.sd.tolist(),
            "coefficients": model.beta[1:].tolist(),
            "selected": [feature_names[i] for i in model.selected]}


def set_report(batch: FitBatch, t: int, rule: str, sites: Sequence[str],
                feature_names: Sequence[str]) -> dict[str, object]:
    mean, se = batch.cv_loss(t)
    return {"sites": list(sites), "lambdas": batch.grids[t].tolist(),
            "cv_loss": mean.tolist(), "cv_se": se.tolist(),
            "chosen": batch.chosen(t, rule),
            "path": batch.coefficients(t).tolist(),
            "model": model_report(batch.model(t, rule), feature_names)}
