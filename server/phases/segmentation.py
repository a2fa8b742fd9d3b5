"""The segmentation phase (issue 17), before the preparation: the protocol's segmentation
network trained over ``segmentation.rounds`` rounds of its aggregator (one of Flower's
strategies, as the CNN's: :mod:`server.strategy`) by the sites that have masks, then sent to
every site, which scores it on its held-out masks and makes the masks of its cases without
one.

The model file (``out-dir/segmentation/segmenter.npz``) is the study's network with the
volume range and part counts of the training masks, from the sums the sites sent with their
updates (no case's volume leaves a site); every site keeps the same file."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.messages import SEGMENTATION, SEGMENTATION_LEAVE_SITE_OUT, MessageType
from common.network import float32_nbytes, state_arrays
from common.records import pack_weights
from common.segmenter import (
    SegmenterLabels,
    build_segmenter,
    header_from_sums,
    network_spacing,
    save_segmenter,
    shape_sum_names,
)
from server.rounds import Transport, exchange, study_config
from server.strategy import cnn_strategy, numbers, protocol_hash_of, train_without
from server.study import Checkpoint, Progress, StudySettings

MODEL_FILE = "segmenter.npz"


def run_segmentation(transport: Transport, nodes: dict[int, str], settings: StudySettings,
                     progress: Progress, checkpoint: Checkpoint | None = None
                     ) -> dict[str, object]:
    """The phase: the rounds (a site without enough masks to train says so each round and is
    asked again the next), the model file, and the final evaluation at every site. Returns
    ``segmentation.json``'s content: the rounds' records, each site's Dice and HD95 per label
    and the counts of masks it made and used."""
    protocol = settings.protocol
    spec = protocol.segmentation
    assert spec is not None  # the orchestrator runs this phase only with a network
    labels = SegmenterLabels.of(protocol)
    initial = state_arrays(build_segmenter(spec, labels.n_classes, network_spacing(protocol),
                                           seed=settings.seed))
    strategy = cnn_strategy(settings, nodes, progress, initial, checkpoint,
                            phase=SEGMENTATION)
    done = checkpoint.segmentation_round if checkpoint is not None else 0
    final: Mapping[str, np.ndarray] = initial
    if done:
        path = settings.out_dir / SEGMENTATION / f"global_round_{done:03d}.npz"
        with np.load(path) as saved:
            final = {k: saved[k] for k in saved.files}
        progress(f"  segmentation: going on from the global model of round {done}")
    config = study_config(settings, seed=settings.seed, test_fraction=settings.test_fraction,
                          phase=SEGMENTATION)
    if done < spec.rounds:
        final = transport.train_rounds(strategy, final, spec.rounds - done, settings.timeout_s,
                                       config)
    records = strategy.records()
    sums, trained = shape_sums(records["history"], labels)  # type: ignore[arg-type]
    header = header_from_sums(protocol, sums, {"sites": trained, "cases": int(sums["masks"])})
    save_segmenter(settings.out_dir / SEGMENTATION / MODEL_FILE, header, final)
    request = pack_weights(final, study_config(
        settings, seed=settings.seed, test_fraction=settings.test_fraction, phase=SEGMENTATION,
        segmenter=header.to_json()))
    replies, failed = exchange(transport, nodes, MessageType.EVALUATE, lambda _: request,
                               settings)
    scored = {}
    for site, reply in sorted(replies.items()):
        if (protocol_hash_of(reply) != protocol.content_hash()
                or "metrics" not in reply.content):
            failed[site] = "final evaluation: not under the study's protocol"
            continue
        scored[site] = numbers(reply.content["metrics"])
    for site, metrics in scored.items():
        progress(f"  segmentation at {site}: {_dice(metrics, labels)}; masks made "
                 f"{_count(metrics, 'auto_used')} of {_count(metrics, 'auto_n')}")
    loso = (leave_site_out(transport, nodes, settings, progress, initial, scored)
            if spec.leave_site_out else None)
    return {"architecture": spec.architecture, "aggregator": spec.aggregator,
            "rounds": spec.rounds, "weights_bytes": float32_nbytes(initial),
            "labels": [{"value": v, "name": n} for v, n in zip(labels.values, labels.names,
                                                               strict=True)],
            "trained_on": header.trained_on, "volume_ml": header.volume_ml,
            "parts": header.parts, **records, "final": scored,
            "failed": strategy.failed | failed,
            **({"leave_site_out": loso} if loso is not None else {})}


def leave_site_out(transport: Transport, nodes: dict[int, str], settings: StudySettings,
                   progress: Progress, initial: Mapping[str, np.ndarray],
                   scored: Mapping[str, Mapping[str, float | None]]) -> dict[str, object]:
    """``segmentation.leave_site_out``: for each site with held-out masks, the same rounds from
    the same initial network by the other sites alone (their records and checkpoints in
    ``out-dir/segmentation_loso/<site>``), scored on the left-out site's test masks. A site is
    skipped, with the reason, when it has no test masks, fewer than ``min_sites`` others are
    left, none of them trained, or its evaluation fails."""
    protocol = settings.protocol
    spec = protocol.segmentation
    assert spec is not None  # the orchestrator runs this phase only with a network
    labels = SegmenterLabels.of(protocol)
    sites: dict[str, dict[str, float | None]] = {}
    skipped: dict[str, str] = {}
    config = study_config(settings, seed=settings.seed, test_fraction=settings.test_fraction,
                          phase=SEGMENTATION)
    for node, site in sorted(nodes.items(), key=lambda item: item[1]):
        if not (scored.get(site) or {}).get("test_n"):
            skipped[site] = "no held-out hand-drawn masks to score it on"
            continue
        federation = train_without(transport, nodes, node, settings, progress, initial, config,
                                   phase=SEGMENTATION)
        if isinstance(federation, str):
            skipped[site] = federation
            continue
        strategy, model = federation
        sums, trained = shape_sums(strategy.records()["history"], labels)  # type: ignore[arg-type]
        if not trained:
            skipped[site] = "no other site trained the network"
            continue
        header = header_from_sums(protocol, sums, {"sites": trained,
                                                   "cases": int(sums["masks"])})
        request = pack_weights(model, study_config(
            settings, seed=settings.seed, test_fraction=settings.test_fraction,
            phase=SEGMENTATION, segmenter=header.to_json(),
            models=(SEGMENTATION_LEAVE_SITE_OUT,)))
        replies, failed = exchange(transport, {node: site}, MessageType.EVALUATE,
                                   lambda _, r=request: r, settings)
        reply = replies.get(site)
        if (reply is None or protocol_hash_of(reply) != protocol.content_hash()
                or "metrics" not in reply.content):
            skipped[site] = failed.get(site, "evaluation: not under the study's protocol")
            continue
        sites[site] = numbers(reply.content["metrics"])
        progress(f"  segmentation without {site}, at {site}: {_dice(sites[site], labels)}")
    return {"sites": sites, "skipped": skipped}


def _dice(metrics: Mapping[str, float | None], labels: SegmenterLabels) -> str:
    return ", ".join(f"{name} Dice {_text(metrics.get(f'label_{v}_dice'))}"
                     for v, name in zip(labels.values, labels.names, strict=True))


def shape_sums(history: Mapping[str, Mapping[str, Mapping[str, float | None]]],
               labels: SegmenterLabels) -> tuple[dict[str, float], list[str]]:
    """The sums of the training masks' shapes over the sites (each site's from the last round
    it trained in: its masks do not change between rounds), and the sites they came from."""
    last: dict[str, Mapping[str, float | None]] = {}
    for _, sites in sorted(history.items(), key=lambda item: int(item[0])):
        last.update(sites)
    names = shape_sum_names(labels)
    sums = {name: float(sum(float(m.get(name) or 0.0) for m in last.values()))
            for name in names}
    return sums, sorted(last)


def _text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _count(metrics: Mapping[str, float | None], key: str) -> str:
    value = metrics.get(key)
    return "n/a" if value is None else ("<min" if value < 0 else str(int(value)))
