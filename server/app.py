"""The Flower ServerApp: the coordinator's study, phase by phase (``flwr run``).

Thin by design: it types the run config once, sends each phase's messages, unpacks the replies
with :mod:`common.records` and calls :mod:`server.study` for every decision.
Phases built so far: 1, the handshake; 2, local preparation; 3, federated ComBat; 4, the
exact federated logistic model on raw and harmonized features, evaluated at every site.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from client.study import (
    Coefficients,
    EvaluationReply,
    HandshakeReply,
    PrepareReply,
    Standardizer,
)
from common.glm import FeatureMoments, LogisticTerms, combine_feature_moments, newton_step
from common.protocol import TaskKind
from common.provenance import atomic_write_json
from common.records import PayloadError, from_record, pack, unpack
from harmonization.combat import (
    BatchMoments,
    DesignMoments,
    LocationFit,
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
    HandshakeSummary,
    StudySettings,
    StudyStopped,
    check_handshake,
    check_prepare,
    combat_design,
    require_sites,
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
    replies, failed = exchange(grid, nodes, "query.handshake",
                               lambda _: RecordDict({"study": _study_config(settings)}), settings)
    answers = collect(replies, failed, None, HandshakeReply)
    nodes_of = {replies[sender].metadata.src_node_id: answer.site
                for sender, answer in answers.items()}
    summary = dataclasses.replace(check_handshake(list(answers.values()), failed, settings),
                                  nodes=nodes_of)
    atomic_write_json(settings.out_dir / "handshake.json", summary.to_json())
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
    replies, failed = {}, {}
    for reply in grid.send_and_receive(messages, timeout=settings.timeout_s):
        site = nodes.get(reply.metadata.src_node_id, f"node {reply.metadata.src_node_id}")
        if reply.has_error():
            failed[site] = f"{message_type}: error {reply.error.code}: {reply.error.reason}"
        else:
            replies[site] = reply
    for site in set(nodes.values()) - set(replies) - set(failed):
        failed[site] = f"{message_type}: no reply within {settings.timeout_s:g} s"
    return replies, failed


def run_prepare(grid: Grid, nodes: dict[int, str], settings: StudySettings):  # noqa: ANN201
    """Phase 2: each site extracts (cached) and splits; counts back."""
    replies, failed = exchange(
        grid, nodes, "query.prepare",
        lambda _: RecordDict({"study": _study_config(
            settings, seed=settings.seed, test_fraction=settings.test_fraction)}), settings)
    parsed = list(collect(replies, failed, None, PrepareReply).values())
    summary = check_prepare(parsed, failed, settings)
    atomic_write_json(settings.out_dir / "prepare.json", summary.to_json())
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
    fit = combine_design_moments(list(moments.values()), design, options)

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
    pooled = PooledVariance(combine_residual_moments(list(residuals.values()), design))
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
        for payload in stacked.values():
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
                       "continuous": list(design.continuous)},
        "harmonized_rows": {site: int(r.content["result"]["rows"])
                            for site, r in replies.items()},
        "failed": failed})
    return failed


def run_model(grid: Grid, nodes: dict[int, str], n_features: int, settings: StudySettings,
              harmonized: bool) -> dict[str, object]:
    """Phase 4: pooled standardization, then Newton steps on the sites' summed gradients and
    Hessians (the pooled ridge-logistic fit, exactly), then every site's test metrics."""
    f = n_features

    def ask(**payloads: object) -> Callable[[int], RecordDict]:
        def content(_: int) -> RecordDict:
            records = pack(**payloads) if payloads else RecordDict({})
            records["study"] = _study_config(settings, harmonized=harmonized, l2=settings.l2)
            return records
        return content

    replies, failed = exchange(grid, nodes, "query.model_moments", ask(), settings)
    moments = collect(replies, failed, "moments", FeatureMoments, {"mean": (f,), "m2": (f,)})
    require_sites(moments, failed, settings, "model standardization")
    nodes = {n: s for n, s in nodes.items() if s in moments}
    pooled = combine_feature_moments(list(moments.values()))
    standardizer = Standardizer(pooled.mean, np.where(pooled.sd > 0, pooled.sd, 1.0))
    beta, rounds = np.zeros(f + 1), 0
    for rounds in range(1, 51):
        replies, more = exchange(grid, nodes, "query.logistic_terms",
                                 ask(scale=standardizer, coef=Coefficients(beta)), settings)
        failed.update(more)
        terms = collect(replies, failed, "terms", LogisticTerms,
                        {"gradient": (f + 1,), "hessian": (f + 1, f + 1)})
        if set(terms) != set(nodes.values()):
            # a site lost mid-fit: its rows are no longer in the sums, so the fit restarts
            # from the sites left (all of them must contribute to every Newton step)
            require_sites(terms, failed, settings, f"Newton round {rounds}")
            nodes = {n: s for n, s in nodes.items() if s in terms}
            beta = np.zeros(f + 1)
            continue
        step = newton_step(list(terms.values()), beta, settings.l2)
        beta = step.beta
        if step.step < 1e-8:
            break
    replies, more = exchange(grid, nodes, "query.evaluate",
                             ask(scale=standardizer, coef=Coefficients(beta)), settings)
    failed.update(more)
    metrics = list(collect(replies, failed, "metrics", EvaluationReply).values())
    return {"harmonized": harmonized, "l2": settings.l2, "newton_rounds": rounds,
            "coefficients": beta.tolist(),  # intercept first, on the pooled standardized scale
            "sites": {m.site: {"n_test": m.n_test, "n_positive": m.n_positive,
                               "auc_federated": m.auc_federated, "auc_local": m.auc_local}
                      for m in sorted(metrics, key=lambda m: m.site)},
            "failed": failed}


def run_study(grid: Grid, settings: StudySettings) -> None:
    """The phases in order, up to ``settings.until``; ``study.json`` says how it ended."""
    status = {"status": "done", "until": settings.until, "reason": ""}
    try:
        summary = run_handshake(grid, settings)
        if not summary.go_on:
            raise StudyStopped(f"handshake: {summary.reason}")
        nodes = {n: s for n, s in summary.nodes.items() if s not in summary.excluded}
        if settings.runs("prepare"):
            prepared = run_prepare(grid, nodes, settings)
            if not prepared.go_on:
                raise StudyStopped(f"local preparation: {prepared.reason}")
            kept = {r.site for r in prepared.kept}
            nodes = {n: s for n, s in nodes.items() if s in kept}
            if settings.runs("combat"):
                failed = run_combat(grid, nodes, prepared.kept, settings)
                nodes = {n: s for n, s in nodes.items() if s not in failed}
            if settings.runs("model"):
                if settings.protocol.task.kind is not TaskKind.CLASSIFICATION:
                    raise StudyStopped("model: regression models are not built yet")
                f = prepared.kept[0].n_features
                results = [run_model(grid, nodes, f, settings, harmonized=False)]
                if settings.runs("combat"):
                    results.append(run_model(grid, nodes, f, settings, harmonized=True))
                atomic_write_json(settings.out_dir / "model.json", {"models": results})
    except StudyStopped as exc:
        status = {"status": "stopped", "until": settings.until, "reason": str(exc)}
        raise
    finally:
        atomic_write_json(settings.out_dir / "study.json", status)


def make_server_app(settings: StudySettings | None = None) -> ServerApp:
    """The ServerApp; ``settings`` None = from the run config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_study(grid, settings or StudySettings.from_run_config(context.run_config))

    return app


app = make_server_app()
