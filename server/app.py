"""The Flower ServerApp: the coordinator's study, phase by phase (``flwr run``).

Thin by design: it types the run config once, sends each phase's messages, unpacks the replies
with :mod:`common.records` and calls :mod:`server.study` for every decision.
Phases built so far: 1, the handshake; 2, local preparation; 3, federated ComBat; 4, the
radiomics model (screening, penalized GLM chosen by federated cross-validation, for all sites
and with each site left out) on raw and harmonized features, evaluated at every site.
"""

from __future__ import annotations

import dataclasses
import json
import time
from logging import INFO
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from client.study import HandshakeReply, ModelMetrics, PrepareReply, clinical_terms, loss_of
from common.errors import ConfigError
from common.protocol import LocalDpSpec, TaskKind
from common.provenance import atomic_write_json
from common.records import PayloadError, from_record, pack, unpack
from common.selection import (
    BatchTerms,
    Comoments,
    FitBatch,
    LinearModel,
    combine_comoments,
    new_batch,
    update_by_site,
)
from harmonization.combat import (
    BatchMoments,
    DesignMoments,
    PooledVariance,
    ResidualMoments,
    StackedAdjustments,
    StackedMoments,
    combine_batch_moments,
    combine_design_moments,
    combine_residual_moments,
    design_to_json,
    estimate_batch_adjustment,
)
from server.study import (
    Checkpoint,
    HandshakeSummary,
    PrepareSummary,
    StudySettings,
    StudyStopped,
    check_handshake,
    check_prepare,
    combat_design,
    load_prepare,
    open_checkpoint,
    pool_sites,
    require_sites,
    training_prevalence,
)


def wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> list[int]:
    """The connected SuperNodes, once at least ``count`` are there (or when time is up)."""
    deadline = time.monotonic() + timeout_s
    nodes = list(grid.get_node_ids())
    while len(nodes) < count and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    return nodes


def run_handshake(grid: Grid, settings: StudySettings) -> HandshakeSummary:
    """Phase 1: the protocol and its hash to every site; counts (or a refusal) back."""
    nodes = {n: f"node {n}" for n in wait_for_nodes(grid, settings.min_sites, settings.timeout_s)}
    started = time.monotonic()
    replies, failed = exchange(grid, nodes, "query.handshake",
                               lambda _: RecordDict({"study": _study_config(settings)}), settings)
    seconds = time.monotonic() - started
    answers = collect(replies, failed, None, HandshakeReply)
    nodes_of = {replies[sender].metadata.src_node_id: answer.site
                for sender, answer in answers.items()}
    summary = dataclasses.replace(check_handshake(list(answers.values()), failed, settings),
                                  nodes=nodes_of)
    atomic_write_json(settings.out_dir / "handshake.json",
                      {**summary.to_json(), "round_seconds": seconds})
    return summary


def _study_config(settings: StudySettings, **extra: object) -> ConfigRecord:
    """What every phase message carries: the protocol (sites keep no state between messages)."""
    return ConfigRecord({
        "protocol": json.dumps(settings.protocol.model_dump(mode="json"), sort_keys=True),
        "protocol_hash": settings.protocol.content_hash(), **extra})


P = TypeVar("P")


def collect(replies: dict[str, Message], failed: dict[str, str], name: str | None,
            cls: type[P], shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, P]:
    """Each reply's payload (packed under ``name``, or alone when None), checked; a site whose
    payload is malformed moves to ``failed`` with the reason instead of stopping the study."""
    out: dict[str, P] = {}
    for site, reply in replies.items():
        try:
            out[site] = (from_record(reply.content, cls, shapes, site) if name is None
                         else unpack(reply.content, name, cls, shapes, site))
        except PayloadError as exc:
            failed[site] = str(exc)
    return out


def exchange(grid: Grid, nodes: dict[int, str], message_type: str,
             content: Callable[[int], RecordDict], settings: StudySettings
             ) -> tuple[dict[str, Message], dict[str, str]]:
    """One round: a message to each node, the replies by site name, and the sites that failed
    (by name, with the reason)."""
    messages = [Message(content(node), message_type=message_type, dst_node_id=node,
                        group_id=message_type) for node in nodes]
    replies, failed, orphans = {}, {}, []
    for reply in grid.send_and_receive(messages, timeout=settings.timeout_s):
        site = nodes.get(reply.metadata.src_node_id)
        if site is None:  # Flower's own error for a node that went silent
            orphans.append(_why(reply))
        elif reply.has_error():
            failed[site] = f"{message_type}: {_why(reply)}"
        else:
            replies[site] = reply
    for site, why in _unanswered(set(nodes.values()) - set(replies) - set(failed), orphans,
                                 settings.timeout_s):
        failed[site] = f"{message_type}: {why}"
    return replies, failed


def _why(reply: Message) -> str:
    return (f"error {reply.error.code}: {reply.error.reason}" if reply.has_error()
            else "a reply from a node that is not a site of the study")


def _unanswered(sites: set[str], orphans: list[str], timeout_s: float
                ) -> list[tuple[str, str]]:
    """Why each of ``sites`` gave no reply of its own. Flower answers for a node that stopped
    sending heartbeats with an error from the SuperLink (not from the node): when there are as
    many such errors as silent sites, each site gets one; otherwise they are named together."""
    sites_sorted = sorted(sites)
    if orphans and len(orphans) == len(sites_sorted):
        return list(zip(sites_sorted, orphans))
    why = f"no reply within {timeout_s:g} s"
    if orphans:
        why += f" ({'; '.join(sorted(set(orphans)))})"
    return [(site, why) for site in sites_sorted]


def run_prepare(grid: Grid, nodes: dict[int, str], settings: StudySettings):  # noqa: ANN201
    """Phase 2: each site extracts (cached) and splits; counts back."""
    started = time.monotonic()
    replies, failed = exchange(
        grid, nodes, "query.prepare",
        lambda _: RecordDict({"study": _study_config(
            settings, seed=settings.seed, test_fraction=settings.test_fraction)}), settings)
    parsed = list(collect(replies, failed, None, PrepareReply).values())
    summary = check_prepare(parsed, failed, settings)
    atomic_write_json(settings.out_dir / "prepare.json",
                      {**summary.to_json(), "round_seconds": time.monotonic() - started})
    return summary


def run_combat(grid: Grid, nodes: dict[int, str], kept: list[PrepareReply],
               settings: StudySettings) -> dict[str, str]:
    """Phase 3: d-ComBat's rounds on the sites' training rows; each site then harmonizes its
    own training and test rows. Returns the sites that failed, by name."""
    design, shared = combat_design(settings.protocol, kept)
    options = settings.combat
    f = kept[0].n_features
    p = design.n_columns
    config = lambda **extra: _study_config(settings, design=design_to_json(design, options),  # noqa: E731
                                           **extra)
    replies, failed = exchange(grid, nodes, "query.combat_design",
                               lambda _: RecordDict({"study": config()}), settings)
    moments = collect(replies, failed, "moments", DesignMoments,
                      {"batch_counts": (design.n_batch,), "xtx": (p, p), "xty": (p, f)})
    require_sites(moments, failed, settings, "ComBat round 1")
    nodes = {n: s for n, s in nodes.items() if s in moments}
    fit = combine_design_moments([moments[s] for s in sorted(moments)], design, options)

    def with_fit(**payloads: object) -> Callable[[int], RecordDict]:
        def content(_: int) -> RecordDict:
            records = pack(fit=fit, **payloads)
            records["study"] = config()
            return records
        return content

    replies, more = exchange(grid, nodes, "query.combat_residuals", with_fit(), settings)
    failed.update(more)
    residuals = collect(replies, failed, "residuals", ResidualMoments,
                        {"batch_counts": (design.n_batch,), "rss": (design.n_batch, f)})
    require_sites(residuals, failed, settings, "ComBat round 2")
    nodes = {n: s for n, s in nodes.items() if s in residuals}
    pooled = PooledVariance(combine_residual_moments([residuals[s] for s in sorted(residuals)],
                                                     design))
    adjustments = StackedAdjustments((), np.zeros((0, f)), np.zeros((0, f)))
    if shared:
        def ask_moments(_: int) -> RecordDict:
            records = pack(fit=fit, var=pooled)
            records["study"] = config(shared_batches=sorted(shared))
            return records

        replies, more = exchange(grid, nodes, "query.combat_moments", ask_moments, settings)
        failed.update(more)
        stacked = collect(replies, failed, "moments", StackedMoments,
                          {"n": (-1,), "mean": (-1, f), "m2": (-1, f)})
        require_sites(stacked, failed, settings, "ComBat round 3")
        nodes = {n: s for n, s in nodes.items() if s in stacked}
        by_batch: dict[str, list[BatchMoments]] = {}
        for _, payload in sorted(stacked.items()):
            for m in payload.unstack():
                by_batch.setdefault(m.batch, []).append(m)
        adjustments = StackedAdjustments.of(
            [estimate_batch_adjustment(combine_batch_moments(parts), options)
             for _, parts in sorted(by_batch.items())], f)
    replies, more = exchange(grid, nodes, "query.combat_apply",
                             with_fit(var=pooled, shared=adjustments), settings)
    failed.update(more)
    atomic_write_json(settings.out_dir / "combat.json", {
        "batches": list(design.batches), "shared_batches": sorted(shared),
        "covariates": {"categorical": [c for c, _ in design.categorical],
                       "continuous": list(design.continuous),
                       "estimation_only": list(design.fit_only)},
        "harmonized_rows": {site: int(r.content["result"]["rows"])
                            for site, r in replies.items()},
        "failed": failed})
    return failed


def run_model(grid: Grid, nodes: dict[int, str], feature_names: Sequence[str],
              settings: StudySettings, harmonized: bool,
              progress: Callable[[str], None] = lambda _: None
              ) -> tuple[dict[str, LinearModel], dict[str, list[str]], dict[str, object]]:
    """Phase 4 on raw or harmonized features: the sites' comoments and local-only models; then
    screening, the penalty path and federated cross-validation of every training set at once
    (all sites, and each site left out), one Newton round a step; then every site's test
    metrics of the federated model, the model trained without it and every site's local model.
    A site lost mid-fit is named and the fits restart without it (every fit needs every one of
    its sites in every step). Returns the chosen model and the sites of each training set, and
    the phase's report."""
    spec = settings.protocol.model
    f = len(feature_names)

    def ask(**extra: object) -> Callable[[dict[str, object]], RecordDict]:
        def content(payloads: dict[str, object]) -> RecordDict:
            records = pack(**payloads) if payloads else RecordDict({})
            records["study"] = _study_config(settings, harmonized=harmonized, **extra)
            return records
        return content

    replies, failed = exchange(grid, nodes, "query.model_summary", lambda _: ask()({}),
                               settings)
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
        lost = _run_batch(grid, nodes, batch, [set(sets[n]) for n in names], settings, ask(),
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

    def evaluation(node: int) -> RecordDict:
        site = nodes[node]
        chosen = to_evaluate(site)
        cut = [prevalence[f"without {site}" if n == "leave-site-out" else n] for n, _ in chosen]
        return ask(models=json.dumps([n for n, _ in chosen]), thresholds=json.dumps(cut),
                   seed=settings.seed)({f"model{i}": m for i, (_, m) in enumerate(chosen)})

    replies, more = exchange(grid, nodes, "query.model_evaluate", evaluation, settings)
    failed.update(more)
    metrics = collect(replies, failed, "metrics", ModelMetrics)
    return models, sets, {
        "harmonized": harmonized, "loss": batch.loss, "penalty": batch.penalty,
        "lambda_rule": spec.lambda_rule, "rounds": batch.rounds,
        "training_sets": {name: _set_report(batch, t, spec.lambda_rule, sets[name],
                                            feature_names)
                          | ({"prevalence": prevalence[name]} if batch.loss == "logistic" else {})
                          for t, name in enumerate(names)},
        "local_models": {s: _model_report(m, feature_names) for s, m in sorted(local.items())},
        "sites": (results := _site_results(metrics, failed)),
        "pooled": pool_sites(results, batch.loss),
        "failed": failed}


#: The nomogram's ridge penalty (per row): next to nothing, but finite when a small training
#: set separates the classes.
NOMOGRAM_L2 = 1e-4


def run_nomogram(grid: Grid, nodes: dict[int, str], settings: StudySettings,
                 radiomics: dict[str, LinearModel], sets: dict[str, list[str]],
                 prevalence: dict[str, float], harmonized: bool,
                 progress: Callable[[str], None]) -> dict[str, object]:
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
    scores = {f"radiomics{t}": radiomics[n] for t, n in enumerate(names)}

    def ask(payloads: dict[str, object]) -> RecordDict:
        records = pack(**payloads, **scores)
        records["study"] = _study_config(settings, harmonized=harmonized, radiomics=count)
        return records

    failed: dict[str, str] = {}
    progress(f"  nomogram: {count} training set(s), terms {', '.join(terms)}")
    lost = _run_batch(grid, nodes, batch, [set(sets[n]) for n in names], settings, ask, failed,
                      progress)
    report: dict[str, object] = {"terms": terms, "l2": NOMOGRAM_L2, "harmonized": harmonized,
                                 "ranges": dict(settings.protocol.model.clinical_ranges),
                                 "rounds": batch.rounds, "failed": failed}
    if lost:
        return report | {"status": f"stopped: site(s) {lost} lost mid-fit"}
    nomograms = {n: LinearModel(np.arange(p), np.zeros(p), np.ones(p), batch.coefficients(t)[0])
                 for t, n in enumerate(names)}

    def evaluation(node: int) -> RecordDict:
        site = nodes[node]
        chosen = [("nomogram", "federated")] + ([("nomogram leave-site-out", f"without {site}")]
                                                if f"without {site}" in nomograms else [])
        records = pack(**{f"model{i}": nomograms[s] for i, (_, s) in enumerate(chosen)},
                       **{f"radiomics{i}": radiomics[s] for i, (_, s) in enumerate(chosen)})
        records["study"] = _study_config(
            settings, harmonized=harmonized, models=json.dumps([n for n, _ in chosen]),
            thresholds=json.dumps([prevalence[s] for _, s in chosen]), seed=settings.seed)
        return records

    replies, more = exchange(grid, nodes, "query.model_evaluate", evaluation, settings)
    failed.update(more)
    metrics = collect(replies, failed, "metrics", ModelMetrics)
    return report | {
        "status": "done",
        "training_sets": {n: {"sites": sets[n], "intercept": float(m.beta[0]),
                              "coefficients": dict(zip(terms, m.beta[1:].tolist())),
                              "odds_ratios": dict(zip(terms, np.exp(m.beta[1:]).tolist()))}
                          for n, m in nomograms.items()},
        "sites": (results := _site_results(metrics, failed)),
        "pooled": pool_sites(results, "logistic")}


def _run_batch(grid: Grid, nodes: dict[int, str], batch: FitBatch, members: list[set[str]],
               settings: StudySettings, ask: Callable[[dict[str, object]], RecordDict],
               failed: dict[str, str], progress: Callable[[str], None]) -> list[str]:
    """Drive every fit of ``batch`` to the end; the sites lost on the way (empty = done)."""
    while not batch.done:
        pending = batch.pending()
        mine = {site: [j for j in pending if site in members[batch.fits[j].set_index]]
                for site in nodes.values()}
        replies, more = exchange(
            grid, nodes, "query.model_terms",
            lambda node: ask({"request": batch.request(mine[nodes[node]])}), settings)
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


def _model_report(model: LinearModel, feature_names: Sequence[str]) -> dict[str, object]:
    """A model as the coordinator keeps it: feature names, standardization and coefficients."""
    return {"intercept": float(model.beta[0]),
            "features": [feature_names[i] for i in model.features],
            "mean": model.mean.tolist(), "sd": model.sd.tolist(),
            "coefficients": model.beta[1:].tolist(),
            "selected": [feature_names[i] for i in model.selected]}


def _set_report(batch: FitBatch, t: int, rule: str, sites: Sequence[str],
                feature_names: Sequence[str]) -> dict[str, object]:
    mean, se = batch.cv_loss(t)
    return {"sites": list(sites), "lambdas": batch.grids[t].tolist(),
            "cv_loss": mean.tolist(), "cv_se": se.tolist(),
            "chosen": batch.chosen(t, rule),
            "path": batch.coefficients(t).tolist(),
            "model": _model_report(batch.model(t, rule), feature_names)}


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{v!r} is not a number")
    return None if v != v else float(v)


def _metric_value(v: object) -> float | None | list[list[float | None]]:
    """A number (None = NaN), or a binned curve: rows of numbers."""
    if isinstance(v, list):
        return [[_number(x) for x in row] for row in v]
    return _number(v)


def _metrics_table(reply: ModelMetrics, site: str, failed: dict[str, str]
                   ) -> tuple[dict[str, dict[str, object]], dict[str, dict[str, float | None]]]:
    """A site's metrics JSON, checked: model names to metric names to numbers (None = NaN) or
    binned curves, and the paired comparisons. A malformed table excludes the site, named."""
    try:
        table = json.loads(reply.table)
        models = {str(model): {str(k): _metric_value(v) for k, v in row.items()}
                  for model, row in table["models"].items()}
        comparisons = {str(name): {str(k): _number(v) for k, v in row.items()}
                       for name, row in table.get("comparisons", {}).items()}
        return models, comparisons
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        failed[site] = f"model metrics: malformed table ({exc!r})"
        return {}, {}


def _site_results(metrics: dict[str, ModelMetrics], failed: dict[str, str]
                  ) -> dict[str, dict[str, object]]:
    """Each site's test counts, metrics per model and paired comparisons (model.json)."""
    out = {}
    for site, m in sorted(metrics.items()):
        models, comparisons = _metrics_table(m, site, failed)
        out[site] = {"n_test": m.n_test, "n_positive": m.n_positive, "metrics": models,
                     "comparisons": comparisons}
    return out


#: FedAdam's moments after the last round (in ``out-dir/cnn``), for a restarted study.
OPTIMIZER_FILE = "optimizer.npz"
STRATEGIES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam",
              "fedmedian": "FedMedian", "trimmed_mean": "FedTrimmedAvg", "krum": "Krum"}


def cnn_strategy(settings: StudySettings, nodes: dict[int, str], progress: Callable[[str], None],
                 expected: Mapping[str, np.ndarray], checkpoint: Checkpoint | None = None
                 ):  # noqa: ANN201 - a flwr Strategy
    """The protocol's aggregator as one of Flower's strategies, extended to keep each site's
    metrics by name every round (Flower's own only average them), to send only to the sites
    still in the study, to refuse updates unlike ``expected`` (the network's arrays) and to
    checkpoint the global model and the rounds' records after every round.

    With a ``checkpoint`` of a study restarted after CNN round k, Flower's rounds 1, 2, ...
    are the study's rounds k + 1, k + 2, ... (what the sites are told, and what is recorded),
    and the records of rounds 1..k are read back from ``cnn_progress.json``. FedAdam's moments
    are saved with each round (``cnn/optimizer.npz``, the last round's) and read back too."""
    from flwr.serverapp import strategy as flower

    spec = settings.protocol.cnn
    base = getattr(flower, STRATEGIES[spec.aggregator])
    options: dict[str, object] = {"fraction_train": 1.0, "fraction_evaluate": 0.0,
                                  "min_train_nodes": settings.min_sites,
                                  "min_available_nodes": settings.min_sites,
                                  "min_evaluate_nodes": settings.min_sites,
                                  "configrecord_key": "study"}
    if spec.aggregator == "fedprox":
        options["proximal_mu"] = spec.proximal_mu
    elif spec.aggregator == "trimmed_mean":
        options["beta"] = spec.trim_fraction
    elif spec.aggregator == "krum":
        options["num_malicious_nodes"] = spec.krum_byzantine
    elif spec.aggregator == "fedadam":
        options |= {"eta": spec.learning_rate * 10, "eta_l": spec.learning_rate}
    checkpoints = settings.out_dir / "cnn"
    protocol_hash = settings.protocol.content_hash()
    offset = checkpoint.cnn_round if checkpoint is not None else 0
    saved: dict = {}
    if offset:
        saved = json.loads((settings.out_dir / "cnn_progress.json").read_text())

    class PerSite(base):  # type: ignore[misc, valid-type]
        history: dict[int, dict[str, dict[str, float | None]]] = {
            int(r): sites for r, sites in saved.get("history", {}).items()}
        failed: dict[str, str] = dict(saved.get("failed", {}))  # a malformed update's site
        left_out: list[dict[str, object]] = list(saved.get("left_out", []))  # who, when, why
        started: dict[int, float] = {}
        round_seconds: dict[int, float] = {  # from sending a round's messages to aggregating
            int(r): t for r, t in saved.get("round_seconds", {}).items()}
        asked: dict[int, set[str]] = {}
        #: the network's own arrays (an aggregate may change a dtype, a site's reply may not)
        shapes = {k: (tuple(a.shape), str(a.dtype)) for k, a in expected.items()}

        def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN201
            server_round += offset
            self.started[server_round] = time.monotonic()
            messages = [m for m in super().configure_train(server_round, arrays, config, grid)
                        if m.metadata.dst_node_id in nodes]
            self.asked[server_round] = {nodes[m.metadata.dst_node_id] for m in messages}
            return messages

        def leave_out(self, server_round: int, site: str, kind: str, reason: str) -> None:
            self.left_out.append({"round": server_round, "site": site, "kind": kind,
                                  "reason": reason})
            if kind == "excluded":  # the first reason a site's update was refused is kept
                self.failed.setdefault(site, f"CNN round {server_round}: {reason}")

        def aggregate_train(self, server_round, replies):  # noqa: ANN001, ANN201
            server_round += offset
            good, answered, orphans = [], set(), []
            for reply in replies:
                site = nodes.get(reply.metadata.src_node_id)
                if site is None:  # Flower's own error for a node that went silent
                    orphans.append(_why(reply))
                    continue
                answered.add(site)
                if reply.has_error():  # a site that dropped out: asked again next round
                    self.leave_out(server_round, site, "dropped", _why(reply))
                    continue
                bad = bad_update(reply, self.shapes, protocol_hash, spec.local_dp)
                if bad:
                    self.leave_out(server_round, site, "excluded", bad)
                    continue
                self.history.setdefault(server_round, {})[site] = _numbers(
                    reply.content["metrics"])
                good.append(reply)
            for site, why in _unanswered(self.asked.get(server_round, set()) - answered,
                                         orphans, settings.timeout_s):
                self.leave_out(server_round, site, "dropped", why)
            arrays, metrics = super().aggregate_train(server_round, good)
            self.round_seconds[server_round] = time.monotonic() - self.started[server_round]
            if arrays is not None:
                checkpoints.mkdir(parents=True, exist_ok=True)
                _save_checkpoint(checkpoints / f"global_round_{server_round:03d}.npz",
                                 {k: v.numpy() for k, v in arrays.items()})
                moments = self.moments()
                if moments:
                    _save_checkpoint(checkpoints / OPTIMIZER_FILE,
                                     moments | {"round": np.array(server_round)})
                atomic_write_json(settings.out_dir / "cnn_progress.json", self.records())
                if checkpoint is not None:
                    checkpoint.cnn_round = server_round
                    checkpoint.save(settings.out_dir)
            out = [e for e in self.left_out if e["round"] == server_round]
            progress(f"  CNN round {server_round}/{spec.rounds}: {len(good)} site(s) trained"
                     + "".join(f", {s} loss {m['train_loss'] or float('nan'):.3f}"
                               for s, m in sorted(self.history.get(server_round, {}).items()))
                     + "".join(f"; {e['site']} {e['kind']}: {e['reason']}" for e in out))
            return arrays, metrics

        def moments(self) -> dict[str, np.ndarray]:
            """FedAdam's first and second moments (Flower's FedOpt ``m_t``, ``v_t``), by
            ``m_t/<weight>``; none for the other aggregators."""
            return {f"{part}/{k}": v for part in ("m_t", "v_t")
                    for k, v in (getattr(self, part, None) or {}).items()}

        def records(self) -> dict[str, object]:
            """Per round: each site's metrics, the seconds it took, who was left out, why."""
            return {"history": {str(r): m for r, m in sorted(self.history.items())},
                    "round_seconds": {str(r): t for r, t in sorted(self.round_seconds.items())},
                    "left_out": self.left_out, "failed": self.failed}

    strategy = PerSite(**options)
    if offset and (checkpoints / OPTIMIZER_FILE).is_file():
        with np.load(checkpoints / OPTIMIZER_FILE) as state:
            if int(state["round"]) != offset:
                raise ConfigError(str(checkpoints / OPTIMIZER_FILE), [
                    f"holds round {int(state['round'])}'s moments, not round {offset}'s"])
            for part in ("m_t", "v_t"):
                setattr(strategy, part, {k.split("/", 1)[1]: state[k] for k in state.files
                                         if k.startswith(f"{part}/")})
    return strategy


def _numbers(metrics: Mapping[str, object]) -> dict[str, float | None]:
    """A site's metric record as JSON numbers (None where a metric is undefined: NaN)."""
    return {k: (None if float(v) != float(v) else float(v)) for k, v in metrics.items()}


def _protocol_hash_of(reply: Message) -> str | None:
    """The hash of the protocol a site's CNN reply says it worked under (None: not said)."""
    site = reply.content.get("site")
    return None if site is None else site.get("protocol_hash")


def bad_update(reply: Message, expected: Mapping[str, tuple[tuple[int, ...], str]],
               protocol_hash: str, local_dp: LocalDpSpec | None = None) -> str:
    """Why a site's train reply cannot be averaged ('' when it can): no weights or metrics, a
    protocol other than the study's, weights whose names, shapes or types differ from the
    global model's (``expected``: name -> (shape, dtype)), NaN or infinite values, no
    positive number of examples, or (``local_dp``) no statement that it was noised as the
    protocol asks."""
    content = reply.content
    if "arrays" not in content or "metrics" not in content:
        return "no weights or no metrics in the reply"
    sent = _protocol_hash_of(reply)
    if sent != protocol_hash:
        return (f"trained under protocol {str(sent)[:12] if sent else '(none)'}, not the "
                f"study's {protocol_hash[:12]}")
    arrays = content["arrays"]
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        return f"weights do not match the model (missing {missing[:3]}, unknown {extra[:3]})"
    for name, array in arrays.items():
        values = array.numpy()
        shape, dtype = expected[name]
        if tuple(values.shape) != shape or str(values.dtype) != dtype:
            return (f"weight '{name}' is {values.dtype}{list(values.shape)}, the model's is "
                    f"{dtype}{list(shape)}")
        if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
            return f"weight '{name}' holds NaN or infinite values"
    examples = content["metrics"].get("num-examples")
    if not isinstance(examples, (int, float)) or not examples > 0:
        return f"num-examples is {examples!r}, not a positive count"
    if local_dp is not None and (content["metrics"].get("dp_epsilon") != local_dp.epsilon
                                 or content["metrics"].get("dp_delta") != local_dp.delta):
        return (f"not noised with the protocol's local DP (epsilon {local_dp.epsilon}, delta "
                f"{local_dp.delta})")
    return ""


def _privacy(dp: LocalDpSpec | None, records: Mapping[str, Any]) -> dict[str, object]:
    """What the CNN's updates disclosed, per site: with local DP, the (epsilon, delta) of each
    round a site sent an update (averaged in, or refused after it arrived) and their basic
    composition over those rounds."""
    if dp is None:
        return {"mechanism": "none"}
    rounds: dict[str, int] = {}
    sent = [site for sites in records["history"].values() for site in sites] + [
        str(e["site"]) for e in records["left_out"] if e["kind"] == "excluded"]
    for site in sent:
        rounds[site] = rounds.get(site, 0) + 1
    return {"mechanism": "local Gaussian (clipped update, noise on every float weight)",
            "epsilon_per_round": dp.epsilon, "delta_per_round": dp.delta,
            "clipping_norm": dp.clipping_norm, "noise_std": dp.noise_std,
            "per_site": {site: {"rounds": r, "epsilon": r * dp.epsilon, "delta": r * dp.delta}
                         for site, r in sorted(rounds.items())},
            "composition": "basic composition (the sum over rounds)"}


def _save_checkpoint(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Numpy arrays by name (a round's global model, FedAdam's moments), written atomically."""
    import io

    from common.provenance import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def run_cnn(grid: Grid, nodes: dict[int, str], settings: StudySettings,
            progress: Callable[[str], None], prevalence: float | None = None,
            checkpoint: Checkpoint | None = None) -> dict[str, object]:
    """Phase 5: the protocol's CNN trained over ``cnn.rounds`` rounds with its aggregator; each
    train reply also carries the site's test metrics of the model it received; a last evaluate
    round scores the final global model at every site but those whose updates were refused.

    A site that drops out of a round (an error reply, or none in time) is recorded in
    ``left_out`` and asked again the next round; a round goes on with the others as long as
    Flower's strategy has ``min_sites`` nodes. A malformed update (see :func:`bad_update`) is
    recorded too, and its site is not scored at the end (``failed``). With a ``checkpoint``
    after round k, training goes on from round k's saved global model."""
    from client.cnn import build_network, float32_nbytes, state_arrays

    spec = settings.protocol.cnn
    network = build_network(spec, settings.protocol.task.kind, seed=settings.seed)
    initial = state_arrays(network)
    strategy = cnn_strategy(settings, nodes, progress, initial, checkpoint)
    done = checkpoint.cnn_round if checkpoint is not None else 0
    start = initial
    if done:
        with np.load(settings.out_dir / "cnn" / f"global_round_{done:03d}.npz") as saved:
            start = {k: saved[k] for k in saved.files}
        progress(f"  CNN: going on from the global model of round {done}")
    final = ArrayRecord({k: Array(v) for k, v in start.items()})
    if done < spec.rounds:
        final = strategy.start(grid, final, num_rounds=spec.rounds - done,
                               timeout=settings.timeout_s,
                               train_config=_study_config(settings, seed=settings.seed)).arrays
    replies, failed = exchange(grid, {n: s for n, s in nodes.items()
                                      if s not in strategy.failed}, "evaluate",
                               lambda _: RecordDict({"arrays": final, "study": _study_config(
                                   settings, seed=settings.seed,
                                   threshold=0.5 if prevalence is None else prevalence)}),
                               settings)
    final_metrics = {}
    for site, reply in sorted(replies.items()):
        if (_protocol_hash_of(reply) != settings.protocol.content_hash()
                or "metrics" not in reply.content):
            failed[site] = "final evaluation: not under the study's protocol"
            continue
        final_metrics[site] = _numbers(reply.content["metrics"])
    records = strategy.records()
    return {"architecture": spec.architecture, "aggregator": spec.aggregator,
            "rounds": spec.rounds, "weights_bytes": float32_nbytes(initial),
            "privacy": _privacy(spec.local_dp, records),
            **records, "final": final_metrics, "failed": strategy.failed | failed}


Progress = Callable[[str], None]


def _flower_log(line: str) -> None:
    log(INFO, "myelofed: %s", line)


def run_study(grid: Grid, settings: StudySettings, progress: Progress = _flower_log) -> None:
    """The phases in order, up to ``settings.until``; ``study.json`` says how it ended.
    ``progress`` gets a line per phase and round (Flower's log by default: ``flwr run
    --stream`` shows it).

    A coordinator restarted mid-study goes on from its checkpoint (:func:`open_checkpoint`):
    the handshake runs again (which sites are there, on which protocol), finished phases are
    read back from their files instead of being redone, and the CNN goes on after its last
    saved round."""
    checkpoint, resumed = open_checkpoint(settings)
    status = {"status": "done", "until": settings.until, "reason": ""}
    atomic_write_json(settings.out_dir / "protocol.json",  # the report shows what was run
                      {"hash": settings.protocol.content_hash(),
                       "protocol": settings.protocol.model_dump(mode="json"),
                       "settings": settings.to_run_config("(this file)")})
    try:
        if resumed:
            progress(f"resuming the study in {settings.out_dir}: finished "
                     f"{', '.join(checkpoint.done) or 'no phase'}"
                     + (f", CNN round {checkpoint.cnn_round}" if checkpoint.cnn_round else ""))
        progress(f"phase 1/5 handshake: waiting for {settings.min_sites}+ sites")
        summary = run_handshake(grid, settings)
        if not summary.go_on:
            raise StudyStopped(f"handshake: {summary.reason}")
        nodes = {n: s for n, s in summary.nodes.items() if s not in summary.excluded}
        progress(f"handshake: {len(nodes)} site(s) go on"
                 + (f", excluded {summary.excluded}" if summary.excluded else ""))
        if settings.runs("prepare"):
            if checkpoint.finished("prepare"):
                prepared = load_prepare(settings.out_dir)
                progress("phase 2/5 local preparation: done before the restart")
            else:
                progress("phase 2/5 local preparation: ingest, standardize, extract, split")
                prepared = run_prepare(grid, nodes, settings)
                if not prepared.go_on:
                    raise StudyStopped(f"local preparation: {prepared.reason}")
                checkpoint.finish(settings.out_dir, "prepare")
            kept = {r.site for r in prepared.kept}
            nodes = {n: s for n, s in nodes.items() if s in kept}
            if settings.runs("combat"):
                if checkpoint.finished("combat"):
                    failed = json.loads((settings.out_dir / "combat.json").read_text())["failed"]
                    progress("phase 3/5 federated ComBat: done before the restart")
                else:
                    progress("phase 3/5 federated ComBat")
                    failed = run_combat(grid, nodes, prepared.kept, settings)
                    checkpoint.finish(settings.out_dir, "combat")
                nodes = {n: s for n, s in nodes.items() if s not in failed}
            if settings.runs("model") and checkpoint.finished("model"):
                progress("phase 4/5 radiomics model: done before the restart")
            elif settings.runs("model"):
                run_models(grid, nodes, prepared, settings, progress)
                checkpoint.finish(settings.out_dir, "model")
            if settings.runs("cnn") and settings.protocol.cnn is not None:
                progress(f"phase 5/5 CNN: {settings.protocol.cnn.architecture}, "
                         f"{settings.protocol.cnn.rounds} rounds of "
                         f"{settings.protocol.cnn.aggregator}")
                atomic_write_json(settings.out_dir / "cnn.json", run_cnn(
                    grid, nodes, settings, progress, training_prevalence(prepared.kept),
                    checkpoint))
                checkpoint.finish(settings.out_dir, "cnn")
    except StudyStopped as exc:
        status = {"status": "stopped", "until": settings.until, "reason": str(exc)}
        progress(f"stopped: {exc}")
        raise
    except BaseException as exc:  # the coordinator failed: a restart resumes the study
        status = {"status": "failed", "until": settings.until,
                  "reason": f"{type(exc).__name__}: {exc}"[:500]}
        raise
    finally:
        atomic_write_json(settings.out_dir / "study.json", status)


def run_models(grid: Grid, nodes: dict[int, str], prepared: PrepareSummary,
               settings: StudySettings, progress: Progress) -> None:
    """Phase 4: the radiomics model on raw features, and on harmonized ones when ComBat ran
    (``model.json``); then the nomogram when the protocol names clinical factors
    (``nomogram.json``)."""
    names = prepared.kept[0].feature_names
    progress("phase 4/5 radiomics model on raw features")
    passes = [run_model(grid, nodes, names, settings, False, progress)]
    if settings.runs("combat"):
        progress("phase 4/5 radiomics model on harmonized features")
        passes.append(run_model(grid, nodes, names, settings, True, progress))
    atomic_write_json(settings.out_dir / "model.json",
                      {"models": [report for _, _, report in passes]})
    if (settings.protocol.model.clinical
            and settings.protocol.task.kind is TaskKind.CLASSIFICATION):
        models, sets, report = passes[-1]  # harmonized when ComBat ran
        prevalence = {n: t["prevalence"] for n, t in report["training_sets"].items()}
        atomic_write_json(settings.out_dir / "nomogram.json", run_nomogram(
            grid, nodes, settings, models, sets, prevalence, len(passes) == 2, progress))


def make_server_app(settings: StudySettings | None = None,
                    progress: Progress = _flower_log) -> ServerApp:
    """The ServerApp; ``settings`` None = from the run config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_study(grid, settings or StudySettings.from_run_config(context.run_config), progress)

    return app


def run_in_simulation(cohort: Path, settings: StudySettings,
                      progress: Progress = _flower_log) -> None:
    """The whole study in Flower's simulation engine: one virtual SuperNode per site folder of
    ``cohort`` (each with a manifest.csv), on this machine."""
    from flwr.simulation import run_simulation

    from client.app import make_client_app

    n_sites = len(list(cohort.glob("*/manifest.csv")))
    run_simulation(server_app=make_server_app(settings, progress),
                   client_app=make_client_app(cohort), num_supernodes=n_sites,
                   backend_config={"client_resources": {"num_cpus": 1}})


app = make_server_app()
