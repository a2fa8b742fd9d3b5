"""Phase 5, the CNN: the protocol's network trained over ``cnn.rounds`` rounds with its
aggregator (Flower's strategies, :mod:`server.strategy`), then the final global model scored at
every site, and (``cnn.leave_site_out``) one federation without each site, scored there; what
the updates disclosed (local differential privacy) per site."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from common.messages import MessageType
from common.network import build_network, float32_nbytes, shared_arrays
from common.payloads import CNN_LEAVE_SITE_OUT
from common.protocol import LocalDpSpec
from common.records import pack_weights
from common.wire import to_wire, wire_nbytes
from server.rounds import Transport, exchange, study_config
from server.strategy import cnn_strategy, numbers, protocol_hash_of, train_without
from server.study import Checkpoint, Progress, StudySettings


def run_cnn(transport: Transport, nodes: dict[int, str], settings: StudySettings,
            progress: Progress, prevalence: float | None = None,
            checkpoint: Checkpoint | None = None) -> dict[str, object]:
    """Phase 5: the protocol's CNN trained over ``cnn.rounds`` rounds with its aggregator; each
    train reply also carries the site's test metrics of the model it received; a last evaluate
    round scores the final global model at every site but those whose updates were refused.

    A site that drops out of a round (an error reply, or none in time) is recorded in
    ``left_out`` and asked again the next round; a round goes on with the others as long as
    Flower's strategy has ``min_sites`` nodes. A malformed update (see
    :func:`server.strategy.bad_update`) is recorded too, and its site is not scored at the end
    (``failed``). With a ``checkpoint`` after round k, training goes on from round k's saved
    global model."""
    spec = settings.protocol.cnn
    assert spec is not None  # the orchestrator runs this phase only with a CNN
    network = build_network(spec, settings.protocol.task.kind, seed=settings.seed)
    initial = shared_arrays(spec, network)  # with FedBN, the sites keep their normalization
    strategy = cnn_strategy(settings, nodes, progress, initial, checkpoint)
    done = checkpoint.cnn_round if checkpoint is not None else 0
    final: Mapping[str, np.ndarray] = initial
    if done:
        with np.load(settings.out_dir / "cnn" / f"global_round_{done:03d}.npz") as saved:
            final = {k: saved[k] for k in saved.files}
        progress(f"  CNN: going on from the global model of round {done}")
    if done < spec.rounds:
        final = transport.train_rounds(strategy, final, spec.rounds - done, settings.timeout_s,
                                       study_config(settings, seed=settings.seed))
    evaluation = pack_weights(final, study_config(
        settings, seed=settings.seed, threshold=0.5 if prevalence is None else prevalence))
    replies, failed = exchange(transport, {n: s for n, s in nodes.items()
                                           if s not in strategy.failed},
                               MessageType.EVALUATE, lambda _: evaluation, settings)
    final_metrics = {}
    for site, reply in sorted(replies.items()):
        if (protocol_hash_of(reply) != settings.protocol.content_hash()
                or "metrics" not in reply.content):
            failed[site] = "final evaluation: not under the study's protocol"
            continue
        final_metrics[site] = numbers(reply.content["metrics"])
    records = strategy.records()
    scored = {n: s for n, s in nodes.items() if s in final_metrics}
    loso = (leave_site_out(transport, scored, settings, progress, initial)
            if spec.leave_site_out else None)
    return {"architecture": spec.architecture, "aggregator": spec.aggregator,
            "rounds": spec.rounds, "weights_bytes": float32_nbytes(initial),
            "local_norm": spec.local_norm, "shared_tensors": len(initial),
            "transfer": spec.transfer, "wire_bytes": wire_nbytes(to_wire(initial, spec.transfer)),
            "privacy": privacy(spec.local_dp, records),
            **records, "final": final_metrics, "failed": strategy.failed | failed,
            **({"leave_site_out": loso} if loso is not None else {})}


def leave_site_out(transport: Transport, nodes: dict[int, str], settings: StudySettings,
                   progress: Progress, initial: Mapping[str, np.ndarray]) -> dict[str, object]:
    """The CNN's leave-one-site-out validation (``cnn.leave_site_out``): for each site, the
    same rounds from the same initial network with the other sites alone (their records and
    checkpoints in ``out-dir/cnn_loso/<site>``), then that model's test metrics at the site
    left out. A site is skipped, with the reason, when fewer than ``min_sites`` others are
    left or its evaluation fails."""
    sites: dict[str, dict[str, float | None]] = {}
    skipped: dict[str, str] = {}
    for node, site in sorted(nodes.items(), key=lambda item: item[1]):
        trained = train_without(transport, nodes, node, settings, progress, initial,
                                study_config(settings, seed=settings.seed))
        if isinstance(trained, str):
            skipped[site] = trained
            continue
        _, model = trained
        request = pack_weights(model, study_config(settings, seed=settings.seed,
                                                   models=(CNN_LEAVE_SITE_OUT,)))
        replies, failed = exchange(transport, {node: site}, MessageType.EVALUATE,
                                   lambda _, r=request: r, settings)
        reply = replies.get(site)
        if (reply is None or protocol_hash_of(reply) != settings.protocol.content_hash()
                or "metrics" not in reply.content):
            skipped[site] = failed.get(site, "evaluation: not under the study's protocol")
            continue
        sites[site] = numbers(reply.content["metrics"])
    return {"sites": sites, "skipped": skipped}


def privacy(dp: LocalDpSpec | None, records: Mapping[str, Any]) -> dict[str, object]:
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
