"""Phase 3, federated ComBat: d-ComBat's rounds on the sites' training rows (the design's
moments, the residuals, the moments of batches shared by sites), with the protocol's CovBat the
same rounds again on the scores of the residuals' principal axes, then each site harmonizes its
own training and test rows with the pooled model. The coordinator's estimates equal the
centralized fit (:mod:`harmonization.combat`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from common.errors import HarmonizationError
from common.messages import MessageType, StudyConfig
from common.payloads import PrepareReply, parse_counts
from common.protocol import StudyProtocol, TaskKind
from common.provenance import atomic_write_json
from common.records import pack_request
from harmonization.combat.design import CombatOptions, Design, design_to_json
from harmonization.combat.eb import StackedAdjustments, estimate_batch_adjustment
from harmonization.combat.moments import (
    BatchMoments,
    DesignMoments,
    LocationFit,
    PooledVariance,
    ResidualMoments,
    StackedMoments,
    combine_batch_moments,
    combine_design_moments,
    combine_residual_moments,
)
from harmonization.covbat import ResidualProducts, principal_axes, score_design, score_options
from harmonization.messages import CombatRequest, HarmonizedRows
from server.rounds import Records, Transport, collect, exchange, study_config
from server.study import StudySettings, StudyStopped, require_sites


def combat_design(protocol: StudyProtocol, kept: list[PrepareReply]) -> tuple[Design, set[str]]:
    """The ComBat design for the sites that go on (their training scanners, the protocol's
    covariates that ComBat protects and, with ``protect_outcome``, the label as a covariate of
    the estimation only) and the batches held by more than one site."""
    holders: Counter[str] = Counter()
    for reply in kept:
        holders.update(parse_counts(reply.batches).keys())
    covariates = protocol.covariates
    categorical = [(c, tuple(lv)) for c, lv in covariates.categorical.items()
                   if covariates.harmonized(c)]
    continuous = [c for c in covariates.continuous if covariates.harmonized(c)]
    fit_only: tuple[str, ...] = ()
    if protocol.protects_outcome:  # the label as the site sends it: see client.phases.combat
        label = protocol.task.label_column
        if protocol.task.kind is TaskKind.CLASSIFICATION:
            categorical.append((label, ("0", "1")))
        else:
            continuous.append(label)
        fit_only = (label,)
    design = Design(tuple(sorted(holders)), tuple(categorical), tuple(continuous),
                    fit_only=fit_only)
    return design, {b for b, k in holders.items() if k > 1}


def requests(settings: StudySettings, config: StudyConfig, **fitted: object
             ) -> Callable[..., Callable[[int], Records]]:
    """The requests of one ComBat design: ``ask(fit, var, adjustments, **extra)`` gives every
    node the same request, with ``extra`` fields in its study config and the ``fitted``
    payloads (CovBat's: the features' ComBat and the axes) in every request."""
    def ask(fit: LocationFit | None = None, var: PooledVariance | None = None,
            adjustments: StackedAdjustments | None = None, **extra: object
            ) -> Callable[[int], Records]:
        study = study_config(settings, design=config.design, **extra) if extra else config
        records = pack_request(CombatRequest(study, fit, var, adjustments,
                                             **fitted))  # type: ignore[arg-type]
        return lambda _: records
    return ask


def run_combat(transport: Transport, nodes: dict[int, str], kept: list[PrepareReply],
               settings: StudySettings) -> dict[str, str]:
    """Phase 3: d-ComBat's rounds on the sites' training rows (then CovBat's, where the protocol
    asks for it); each site then harmonizes its own training and test rows. Returns the sites
    whose rows were not harmonized, by name, with the reason.

    ComBat serves the study but is not needed for it: a site that refuses it (its release
    ledger finds that two covariates' crossing holds too few patients, a scanner is too small)
    or fails goes on with raw features only, and where fewer than min-sites can take part or
    the pooled design cannot be fitted, ComBat does not run (``combat.json`` says why) and the
    whole study goes on with raw features. Where CovBat cannot run, the sites apply ComBat
    alone (``combat.json`` says why)."""
    failed: dict[str, str] = {}
    try:
        report = {"status": "done", **_rounds(transport, nodes, kept, settings, failed)}
    except (StudyStopped, HarmonizationError) as exc:
        failed = {s: failed.get(s, "ComBat did not run") for s in nodes.values()}
        report = {"status": "not run", "reason": str(exc)}
    atomic_write_json(settings.out_dir / "combat.json", {**report, "failed": failed})
    return failed


Estimates = tuple[LocationFit, PooledVariance, StackedAdjustments]


def _rounds(transport: Transport, nodes: dict[int, str], kept: list[PrepareReply],
            settings: StudySettings, failed: dict[str, str]) -> dict[str, object]:
    """ComBat's rounds (and CovBat's); the sites that fail go to ``failed``. What
    ``combat.json`` says of the fit: its scanners, covariates, CovBat's components and the rows
    each site harmonized."""
    options = settings.combat
    f = kept[0].n_features
    while True:  # round 1, again without the sites that refused it (their scanners leave too)
        design, shared = combat_design(settings.protocol,
                                       [r for r in kept if r.site in nodes.values()])
        config = study_config(settings, design=design_to_json(design, options))
        ask = requests(settings, config)
        moments = _design_round(transport, nodes, ask, design, f, settings, failed, "ComBat")
        if len(moments) == len(nodes):
            break
        nodes = {n: s for n, s in nodes.items() if s in moments}
    estimates, nodes = _pooled_rounds(transport, nodes, ask, design, options, shared, moments,
                                      f, settings, failed, "ComBat")
    covbat: dict[str, object] = {"status": "off"}
    spec = settings.protocol.harmonization.covbat
    if spec is not None:
        try:
            ask, estimates, nodes, covbat = _covbat(transport, nodes, config, design, shared,
                                                    estimates, f, settings, failed)
        except (StudyStopped, HarmonizationError) as exc:
            covbat = {"status": "not run", "reason": str(exc)}
            nodes = {n: s for n, s in nodes.items() if s not in failed}
    replies, more = exchange(transport, nodes, MessageType.COMBAT_APPLY, ask(*estimates),
                             settings)
    failed.update(more)
    harmonized = collect(replies, failed, "result", HarmonizedRows)
    return {"batches": list(design.batches), "shared_batches": sorted(shared),
            "covariates": {"categorical": [c for c, _ in design.categorical],
                           "continuous": list(design.continuous),
                           "estimation_only": list(design.fit_only)},
            "covbat": covbat,
            "harmonized_rows": {site: r.rows for site, r in harmonized.items()},
            "scanner_features": {site: r.scanner_features() for site, r in harmonized.items()}}


def _design_round(transport: Transport, nodes: dict[int, str],
                  ask: Callable[..., Callable[[int], Records]], design: Design, f: int,
                  settings: StudySettings, failed: dict[str, str], stage: str
                  ) -> dict[str, DesignMoments]:
    """Round 1: every site's design moments (``f`` columns of rows)."""
    p = design.n_columns
    replies, more = exchange(transport, nodes, MessageType.COMBAT_DESIGN, ask(), settings)
    failed.update(more)
    moments = collect(replies, failed, "moments", DesignMoments,
                      {"batch_counts": (design.n_batch,), "xtx": (p, p), "xty": (p, f)})
    require_sites(moments, failed, settings, f"{stage} round 1")
    return moments


def _pooled_rounds(transport: Transport, nodes: dict[int, str],
                   ask: Callable[..., Callable[[int], Records]], design: Design,
                   options: CombatOptions, shared: set[str], moments: dict[str, DesignMoments],
                   f: int, settings: StudySettings, failed: dict[str, str], stage: str
                   ) -> tuple[Estimates, dict[int, str]]:
    """Rounds 2 and 3 after round 1's ``moments``: the pooled location fit, variance and the
    adjustments of the batches shared by sites; with the sites that go on."""
    nodes = {n: s for n, s in nodes.items() if s in moments}
    fit = combine_design_moments([moments[s] for s in sorted(moments)], design, options)
    replies, more = exchange(transport, nodes, MessageType.COMBAT_RESIDUALS, ask(fit), settings)
    failed.update(more)
    residuals = collect(replies, failed, "residuals", ResidualMoments,
                        {"batch_counts": (design.n_batch,), "rss": (design.n_batch, f)})
    require_sites(residuals, failed, settings, f"{stage} round 2")
    nodes = {n: s for n, s in nodes.items() if s in residuals}
    pooled = PooledVariance(combine_residual_moments([residuals[s] for s in sorted(residuals)],
                                                     design))
    adjustments = StackedAdjustments((), np.zeros((0, f)), np.zeros((0, f)))
    if shared:
        replies, more = exchange(transport, nodes, MessageType.COMBAT_MOMENTS,
                                 ask(fit, pooled, shared_batches=tuple(sorted(shared))),
                                 settings)
        failed.update(more)
        stacked = collect(replies, failed, "moments", StackedMoments,
                          {"n": (-1,), "mean": (-1, f), "m2": (-1, f)})
        require_sites(stacked, failed, settings, f"{stage} round 3")
        nodes = {n: s for n, s in nodes.items() if s in stacked}
        by_batch: dict[str, list[BatchMoments]] = {}
        for _, payload in sorted(stacked.items()):
            for m in payload.unstack():
                by_batch.setdefault(m.batch, []).append(m)
        adjustments = StackedAdjustments.of(
            [estimate_batch_adjustment(combine_batch_moments(parts), options)
             for _, parts in sorted(by_batch.items())], f)
    return (fit, pooled, adjustments), nodes


def _covbat(transport: Transport, nodes: dict[int, str], config: StudyConfig, design: Design,
            shared: set[str], combat: Estimates, f: int, settings: StudySettings,
            failed: dict[str, str]
            ) -> tuple[Callable[..., Callable[[int], Records]], Estimates, dict[int, str],
                       dict[str, object]]:
    """CovBat's rounds after ComBat's (:mod:`harmonization.covbat`): the sums of the residuals'
    outer products, their principal axes, then d-ComBat's rounds on the scores. Returns the
    requests of the scores' rounds, their estimates, the sites that go on and what
    ``combat.json`` says of CovBat."""
    spec = settings.protocol.harmonization.covbat
    assert spec is not None
    fitted = dict(zip(("combat_fit", "combat_var", "combat_shared"), combat, strict=True))
    replies, more = exchange(transport, nodes, MessageType.COVBAT_PRODUCTS,
                             requests(settings, config, **fitted)(), settings)
    failed.update(more)
    products = collect(replies, failed, "products", ResidualProducts,
                       {"total": (f,), "products": (f, f)})
    require_sites(products, failed, settings, "CovBat round 1")
    nodes = {n: s for n, s in nodes.items() if s in products}
    axes = principal_axes([products[s] for s in sorted(products)], spec.pct_var, spec.n_pc)
    k = axes.components.shape[1]
    ask = requests(settings, config, **fitted, axes=axes)
    scores = score_design(design)
    moments = _design_round(transport, nodes, ask, scores, k, settings, failed, "CovBat")
    estimates, nodes = _pooled_rounds(transport, nodes, ask, scores,
                                      score_options(settings.combat), shared, moments, k,
                                      settings, failed, "CovBat")
    return ask, estimates, nodes, {"status": "done", "components": k,
                                   "explained": round(axes.explained, 4),
                                   "pct_var": spec.pct_var, "n_pc": spec.n_pc}
