"""The nomogram: a logistic model (or, for a survival task, a Cox model stratified by site) of
the radiomics score (the chosen radiomics model's linear predictor) and the protocol's clinical
factors (``model.clinical``, e.g. ISS stage and age), fitted exactly by Newton rounds for every
training set with that set's own radiomics model, then scored at every site; each factor's
odds or hazard ratio with its 95% CI from the summed Hessian."""

from __future__ import annotations

import numpy as np

from common.messages import EvaluateRequest, MessageType, ModelTermsRequest
from common.metrics.base import Z95
from common.payloads import NOMOGRAM_L2, ModelMetrics, clinical_terms, loss_of
from common.records import pack_request
from common.selection.batch import FitBatch
from common.selection.model import LinearModel
from server.phases.radiomics import run_batch
from server.phases.validation import pool_sites, site_results
from server.rounds import Records, Transport, collect, exchange, study_config
from server.study import Progress, StudySettings


def run_nomogram(transport: Transport, nodes: dict[int, str], settings: StudySettings,
                 radiomics: dict[str, LinearModel], sets: dict[str, list[str]],
                 prevalence: dict[str, float], harmonized: bool,
                 progress: Progress) -> dict[str, object]:
    """The nomogram: a logistic (or stratified Cox) model of the radiomics score (the chosen
    model's linear predictor) and the protocol's clinical columns (``model.clinical``), by
    Newton rounds for every training set with that set's own radiomics model, then scored at
    every site (the federated nomogram, and the one trained without the site; a logistic one
    cut at its training set's ``prevalence``)."""
    terms = ["radiomics score", *clinical_terms(settings.protocol)]
    nodes = {n: s for n, s in nodes.items() if s in sets["federated"]}  # the model's sites
    p = len(terms)
    members = {n: list(sets[n]) for n in sets if n in radiomics}
    failed: dict[str, str] = {}  # sites that could not score the nomograms
    left_out: dict[str, str] = {}  # sites that could not send the fits' terms
    report: dict[str, object] = {"terms": terms, "l2": NOMOGRAM_L2, "harmonized": harmonized,
                                 "ranges": dict(settings.protocol.model.clinical_ranges),
                                 "left_out": left_out, "failed": failed}
    fitting = dict(nodes)
    loss = loss_of(settings.protocol)
    while True:
        names = list(members)
        count = len(names)
        batch = FitBatch(loss, "ridge", np.array([np.arange(t * p, (t + 1) * p)
                                                        for t in range(count)]),
                         np.zeros((count, p)), np.ones((count, p)),
                         np.full((count, 1), NOMOGRAM_L2), np.zeros(count), folds=0)
        scores = tuple(radiomics[n] for n in names)
        study = study_config(settings, harmonized=harmonized, radiomics=count)
        progress(f"  nomogram: {count} training set(s), terms {', '.join(terms)}")
        lost = run_batch(transport, fitting, batch, [set(members[n]) for n in names], settings,
                         lambda request, study=study, scores=scores: pack_request(
                             ModelTermsRequest(study, request, scores)),
                         left_out, progress)
        if not lost:
            break
        # a site that cannot send the terms (e.g. its release ledger refuses a clinical level
        # of too few patients) leaves the nomogram's fits, which restart without it; it still
        # scores the nomograms on its test rows
        progress(f"  nomogram: restarting without {', '.join(lost)}")
        fitting = {n: s for n, s in fitting.items() if s not in lost}
        members = {n: [s for s in m if s not in lost] for n, m in members.items()}
        members = {n: m for n, m in members.items() if m}
        if "federated" not in members or len(members["federated"]) < settings.min_sites:
            return report | {"rounds": batch.rounds,
                             "status": f"stopped: site(s) {sorted(left_out)} could not send "
                                       f"the terms and fewer than min-sites = "
                                       f"{settings.min_sites} remain"}
    report["rounds"] = batch.rounds
    nomograms = {n: LinearModel(np.arange(p), np.zeros(p), np.ones(p), batch.coefficients(t)[0])
                 for t, n in enumerate(names)}

    def evaluation(node: int) -> Records:
        site = nodes[node]
        chosen = [("nomogram", "federated")] + ([("nomogram leave-site-out", f"without {site}")]
                                                if f"without {site}" in nomograms else [])
        return pack_request(EvaluateRequest(
            study_config(settings, harmonized=harmonized,
                         models=tuple(n for n, _ in chosen),
                         thresholds=tuple(prevalence.get(s, 0.5) for _, s in chosen),
                         seed=settings.seed,
                         site_update=settings.protocol.validation.site_update or None),
            tuple(nomograms[s] for _, s in chosen), tuple(radiomics[s] for _, s in chosen)))

    replies, more = exchange(transport, nodes, MessageType.MODEL_EVALUATE, evaluation, settings)
    failed.update(more)
    metrics = collect(replies, failed, "metrics", ModelMetrics)
    ratio = "hazard_ratios" if loss == "cox" else "odds_ratios"

    def ratios(t: int, beta: np.ndarray) -> dict[str, list[float]]:
        """Each term's ratio with its 95% CI (Wald, from the penalized fit's Hessian)."""
        se = np.sqrt(np.diag(batch.covariance(t))[1:])
        return {term: [float(np.exp(b)), float(np.exp(b - Z95 * e)), float(np.exp(b + Z95 * e))]
                for term, b, e in zip(terms, beta[1:], se, strict=True)}

    return report | {
        "status": "done", "loss": loss, "ratio": ratio,
        "training_sets": {n: {"sites": members[n], "intercept": float(m.beta[0]),
                              "coefficients": dict(zip(terms, m.beta[1:].tolist(), strict=True)),
                              ratio: ratios(t, m.beta)}
                          for t, (n, m) in enumerate(nomograms.items())},
        "sites": (results := site_results(metrics, failed)),
        "pooled": pool_sites(results, loss)}
