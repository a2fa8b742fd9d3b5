"""The nomogram: a logistic model of the radiomics score (the chosen radiomics model's logit)
and the protocol's clinical factors (``model.clinical``, e.g. ISS stage and age), fitted exactly
by Newton rounds for every training set with that set's own radiomics model, then scored at
every site."""

from __future__ import annotations

import numpy as np

from common.messages import EvaluateRequest, MessageType, ModelTermsRequest
from common.payloads import ModelMetrics, clinical_terms
from common.records import pack_request
from common.selection.batch import FitBatch
from common.selection.model import LinearModel
from server.phases.radiomics import run_batch
from server.phases.validation import pool_sites, site_results
from server.rounds import Records, Transport, collect, exchange, study_config
from server.study import Progress, StudySettings

#: The nomogram's ridge penalty (per row): next to nothing, but finite when a small training
#: set separates the classes.
NOMOGRAM_L2 = 1e-4


def run_nomogram(transport: Transport, nodes: dict[int, str], settings: StudySettings,
                 radiomics: dict[str, LinearModel], sets: dict[str, list[str]],
                 prevalence: dict[str, float], harmonized: bool,
                 progress: Progress) -> dict[str, object]:
    """The nomogram: a logistic model of the radiomics score (the chosen model's logit) and the
    protocol's clinical columns (``model.clinical``), by Newton rounds for every training set
    with that set's own radiomics model, then scored at every site (the federated nomogram, and
    the one trained without the site; each cut at its training set's ``prevalence``)."""
    terms = ["radiomics score", *clinical_terms(settings.protocol)]
    nodes = {n: s for n, s in nodes.items() if s in sets["federated"]}  # the model's sites
    p, names = len(terms), [n for n in sets if n in radiomics]
    count = len(names)
    batch = FitBatch("logistic", "ridge", np.array([np.arange(t * p, (t + 1) * p)
                                                    for t in range(count)]),
                     np.zeros((count, p)), np.ones((count, p)), np.full((count, 1), NOMOGRAM_L2),
                     np.zeros(count), folds=0)
    scores = tuple(radiomics[n] for n in names)
    study = study_config(settings, harmonized=harmonized, radiomics=count)

    failed: dict[str, str] = {}
    progress(f"  nomogram: {count} training set(s), terms {', '.join(terms)}")
    lost = run_batch(transport, nodes, batch, [set(sets[n]) for n in names], settings,
                     lambda request: pack_request(ModelTermsRequest(study, request, scores)),
                     failed, progress)
    report: dict[str, object] = {"terms": terms, "l2": NOMOGRAM_L2, "harmonized": harmonized,
                                 "ranges": dict(settings.protocol.model.clinical_ranges),
                                 "rounds": batch.rounds, "failed": failed}
    if lost:
        return report | {"status": f"stopped: site(s) {lost} lost mid-fit"}
    nomograms = {n: LinearModel(np.arange(p), np.zeros(p), np.ones(p), batch.coefficients(t)[0])
                 for t, n in enumerate(names)}

    def evaluation(node: int) -> Records:
        site = nodes[node]
        chosen = [("nomogram", "federated")] + ([("nomogram leave-site-out", f"without {site}")]
                                                if f"without {site}" in nomograms else [])
        return pack_request(EvaluateRequest(
            study_config(settings, harmonized=harmonized,
                         models=tuple(n for n, _ in chosen),
                         thresholds=tuple(prevalence[s] for _, s in chosen), seed=settings.seed),
            tuple(nomograms[s] for _, s in chosen), tuple(radiomics[s] for _, s in chosen)))

    replies, more = exchange(transport, nodes, MessageType.MODEL_EVALUATE, evaluation, settings)
    failed.update(more)
    metrics = collect(replies, failed, "metrics", ModelMetrics)
    return report | {
        "status": "done",
        "training_sets": {n: {"sites": sets[n], "intercept": float(m.beta[0]),
                              "coefficients": dict(zip(terms, m.beta[1:].tolist(), strict=True)),
                              "odds_ratios": dict(zip(terms, np.exp(m.beta[1:]).tolist(),
                                                      strict=True))}
                          for n, m in nomograms.items()},
        "sites": (results := site_results(metrics, failed)),
        "pooled": pool_sites(results, "logistic")}
