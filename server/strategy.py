"""The CNN's aggregation: the protocol's aggregator as one of Flower's strategies, extended to
keep each site's metrics by name every round (Flower's own only average them), to send only to
the sites still in the study, to refuse an update unlike the network (:func:`bad_update`), to
send the weights in the protocol's precision (``cnn.transfer``) and to checkpoint the global
model, FedAdam's moments and the rounds' records after every round.

One of the modules that work on Flower's own objects (with the apps and the record packing).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flower
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from common.errors import ConfigError
from common.messages import STUDY_RECORD, StudyConfig
from common.protocol import LocalDpSpec
from common.provenance import atomic_write_json, atomic_write_npz
from common.wire import from_wire, to_wire
from server.rounds import unanswered
from server.study import Checkpoint, Progress, StudySettings

#: FedAdam's moments after the last round (in ``out-dir/cnn``), for a restarted study.
OPTIMIZER_FILE = "optimizer.npz"
STRATEGIES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam",
              "fedmedian": "FedMedian", "trimmed_mean": "FedTrimmedAvg", "krum": "Krum"}


def error_text(reply: Message) -> str:
    """What a reply that carries no payload says (Flower's error code and reason)."""
    return (f"error {reply.error.code}: {reply.error.reason}" if reply.has_error()
            else "a reply from a node that is not a site of the study")


def numbers(metrics: Mapping[str, object]) -> dict[str, float | None]:
    """A site's metric record as JSON numbers (None where a metric is undefined: NaN)."""
    return {k: (None if float(v) != float(v) else float(v))  # type: ignore[arg-type]
            for k, v in metrics.items()}


def protocol_hash_of(reply: Message) -> str | None:
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
    sent = protocol_hash_of(reply)
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


class PerSite:
    """The study's extension of a Flower strategy (a mixin before the strategy's class, see
    :func:`cnn_strategy`): per-site records of every round, updates checked before they are
    averaged, a checkpoint after every round.

    With ``offset`` k (a study restarted after round k of the phase), Flower's rounds 1, 2, ...
    are the study's rounds k + 1, k + 2, ... (what the sites are told, and what is recorded),
    and the records of rounds 1..k come from ``saved`` (``<phase>_progress.json``).

    ``phase`` is the network's: ``"cnn"`` or ``"segmentation"`` (its checkpoints under
    ``out-dir/<phase>``; the weights' precision on the wire and local DP are the CNN's)."""

    def __init__(self, *, settings: StudySettings, nodes: dict[int, str], progress: Progress,
                 expected: Mapping[str, np.ndarray], checkpoint: Checkpoint | None,
                 saved: Mapping[str, Any], phase: str = "cnn", **options: Any) -> None:
        super().__init__(**options)
        self.settings, self.nodes, self.progress, self.checkpoint = (
            settings, nodes, progress, checkpoint)
        self.phase = phase
        self.title = "CNN" if phase == "cnn" else phase.capitalize()
        spec = settings.protocol.cnn if phase == "cnn" else settings.protocol.segmentation
        assert spec is not None  # a network's phase runs only with its section in the protocol
        self.rounds = spec.rounds
        self.local_dp = settings.protocol.cnn.local_dp if settings.protocol.cnn and phase == (
            "cnn") else None
        self.offset = checkpoint.rounds_of(phase) if checkpoint is not None else 0
        self.history: dict[int, dict[str, dict[str, float | None]]] = {
            int(r): sites for r, sites in saved.get("history", {}).items()}
        self.failed: dict[str, str] = dict(saved.get("failed", {}))  # a malformed update's site
        self.left_out: list[dict[str, Any]] = list(saved.get("left_out", []))  # who, when, why
        self.started: dict[int, float] = {}
        self.round_seconds: dict[int, float] = {  # from sending a round's messages to aggregating
            int(r): t for r, t in saved.get("round_seconds", {}).items()}
        self.asked: dict[int, set[str]] = {}
        #: the network's arrays as they travel (``cnn.transfer``): an aggregate may change a
        #: dtype, a site's reply may not
        self.transfer = (settings.protocol.cnn.transfer if settings.protocol.cnn and phase == "cnn"
                         else "float32")
        self.shapes = {k: (tuple(a.shape), str(a.dtype))
                       for k, a in to_wire(expected, self.transfer).items()}
        self.checkpoints = settings.out_dir / phase
        self.protocol_hash = settings.protocol.content_hash()

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
        server_round += self.offset
        self.started[server_round] = time.monotonic()
        messages = [m for m in super().configure_train(  # type: ignore[misc]
            server_round, arrays, config, grid) if m.metadata.dst_node_id in self.nodes]
        if self.transfer != "float32":  # the global model stays float32 here
            wire = ArrayRecord({k: Array(v) for k, v in to_wire(
                {k: a.numpy() for k, a in arrays.items()}, self.transfer).items()})
            for message in messages:
                message.content["arrays"] = wire
        self.asked[server_round] = {self.nodes[m.metadata.dst_node_id] for m in messages}
        return messages

    def leave_out(self, server_round: int, site: str, kind: str, reason: str) -> None:
        self.left_out.append({"round": server_round, "site": site, "kind": kind,
                              "reason": reason})
        if kind == "excluded":  # the first reason a site's update was refused is kept
            self.failed.setdefault(site, f"{self.title} round {server_round}: {reason}")

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
        server_round += self.offset
        good, answered, orphans = [], set(), []
        for reply in replies:
            site = self.nodes.get(reply.metadata.src_node_id)
            if site is None:  # Flower's own error for a node that went silent
                orphans.append(error_text(reply))
                continue
            answered.add(site)
            if reply.has_error():  # a site that dropped out: asked again next round
                self.leave_out(server_round, site, "dropped", error_text(reply))
                continue
            bad = bad_update(reply, self.shapes, self.protocol_hash, self.local_dp)
            if bad:
                self.leave_out(server_round, site, "excluded", bad)
                continue
            self.history.setdefault(server_round, {})[site] = numbers(reply.content["metrics"])
            if self.transfer != "float32":  # averaged in float32
                reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in from_wire(
                    {k: a.numpy() for k, a in reply.content["arrays"].items()}).items()})
            good.append(reply)
        for site, why in unanswered(self.asked.get(server_round, set()) - answered, orphans,
                                    self.settings.timeout_s):
            self.leave_out(server_round, site, "dropped", why)
        # in site order: Flower sums the updates in the order they arrive, and float sums in
        # another order differ in their last bits (the global model must not depend on timing)
        good.sort(key=lambda reply: self.nodes[reply.metadata.src_node_id])
        arrays, metrics = super().aggregate_train(server_round, good)  # type: ignore[misc]
        self.round_seconds[server_round] = time.monotonic() - self.started[server_round]
        if arrays is not None:
            self.save(server_round, arrays)
        out = [e for e in self.left_out if e["round"] == server_round]
        self.progress(f"  {self.title} round {server_round}/{self.rounds}: {len(good)} site(s) "
                      "trained"
                      + "".join(f", {s} loss {m['train_loss'] or float('nan'):.3f}"
                                for s, m in sorted(self.history.get(server_round, {}).items()))
                      + "".join(f"; {e['site']} {e['kind']}: {e['reason']}" for e in out))
        return arrays, metrics

    def save(self, server_round: int, arrays: ArrayRecord) -> None:
        """The round's global model, FedAdam's moments and the records so far."""
        self.checkpoints.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_npz(self.checkpoints / f"global_round_{server_round:03d}.npz",
                    {k: v.numpy() for k, v in arrays.items()})
        moments = self.moments()
        if moments:
            atomic_write_npz(self.checkpoints / OPTIMIZER_FILE,
                        moments | {"round": np.array(server_round)})
        atomic_write_json(self.settings.out_dir / f"{self.phase}_progress.json", self.records())
        if self.checkpoint is not None:
            self.checkpoint.set_rounds(self.phase, server_round)
            self.checkpoint.save(self.settings.out_dir)

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


def _is_count(key: str) -> bool:
    """A metric that counts crops (``test_n``, ``global_train_n_positive``)."""
    return key.endswith(("_n", "_n_positive")) or key in ("n", "n_positive")


def sum_counts(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Flower's aggregate of the sites' metrics, weighted by ``weighting_metric_name``, except
    that counts are summed (Flower's weighted mean of counts, e.g. 25.36 crops, means nothing):
    the sum of the sites' counts, or -1 when a site withheld its count (under its minimum)."""
    aggregated = aggregate_metricrecords(records, weighting_metric_name)
    for key in [k for k in aggregated if _is_count(k)]:
        counts = [float(value) for record in records for metrics in
                  record.metric_records.values() for k, value in metrics.items() if k == key]
        aggregated[key] = -1 if any(c < 0 for c in counts) else int(sum(counts))
    return aggregated


def cnn_strategy(settings: StudySettings, nodes: dict[int, str], progress: Progress,
                 expected: Mapping[str, np.ndarray], checkpoint: Checkpoint | None = None,
                 phase: str = "cnn") -> PerSite:
    """The protocol's aggregator of a network's ``phase`` (the CNN's, or with ``phase =
    "segmentation"`` the segmentation network's) as one of Flower's strategies with the study's
    extension (:class:`PerSite`). With a ``checkpoint`` after round k of the phase, the records
    of rounds 1..k are read back from ``<phase>_progress.json`` and FedAdam's moments from
    ``<phase>/optimizer.npz``."""
    spec = settings.protocol.cnn if phase == "cnn" else settings.protocol.segmentation
    assert spec is not None  # a network's phase runs only with its section in the protocol
    base = getattr(flower, STRATEGIES[spec.aggregator])
    options: dict[str, object] = {"fraction_train": 1.0, "fraction_evaluate": 0.0,
                                  "min_train_nodes": settings.min_sites,
                                  "min_available_nodes": settings.min_sites,
                                  "min_evaluate_nodes": settings.min_sites,
                                  "configrecord_key": STUDY_RECORD,
                                  "train_metrics_aggr_fn": sum_counts,
                                  "evaluate_metrics_aggr_fn": sum_counts}
    if spec.aggregator == "fedprox":
        options["proximal_mu"] = spec.proximal_mu
    elif spec.aggregator == "trimmed_mean":
        options["beta"] = spec.trim_fraction
    elif spec.aggregator == "krum":
        options["num_malicious_nodes"] = spec.krum_byzantine
    elif spec.aggregator == "fedadam":
        options |= {"eta": spec.learning_rate * 10, "eta_l": spec.learning_rate}
    offset = checkpoint.rounds_of(phase) if checkpoint is not None else 0
    saved: dict[str, Any] = {}
    if offset:
        saved = json.loads((settings.out_dir / f"{phase}_progress.json").read_text())
    cls = type(f"PerSite{base.__name__}", (PerSite, base), {})
    strategy: PerSite = cls(settings=settings, nodes=nodes, progress=progress,
                            expected=expected, checkpoint=checkpoint, saved=saved, phase=phase,
                            **options)
    optimizer = settings.out_dir / phase / OPTIMIZER_FILE
    if offset and optimizer.is_file():
        with np.load(optimizer) as state:
            if int(state["round"]) != offset:
                raise ConfigError(str(optimizer), [
                    f"holds round {int(state['round'])}'s moments, not round {offset}'s"])
            for part in ("m_t", "v_t"):
                setattr(strategy, part, {k.split("/", 1)[1]: state[k] for k in state.files
                                         if k.startswith(f"{part}/")})
    return strategy


def train_rounds(grid: Grid, strategy: PerSite, start: Mapping[str, np.ndarray], rounds: int,
                 timeout_s: float, study: StudyConfig) -> dict[str, np.ndarray]:
    """``rounds`` rounds of Flower's strategy from the global weights ``start``; the final
    global weights."""
    result = strategy.start(  # type: ignore[attr-defined]
        grid, ArrayRecord({k: Array(v) for k, v in start.items()}), num_rounds=rounds,
        timeout=timeout_s, train_config=ConfigRecord(study.to_mapping()))
    return {k: v.numpy() for k, v in result.arrays.items()}


def train_without(transport: Any, nodes: dict[int, str], node: int, settings: StudySettings,
                  progress: Progress, initial: Mapping[str, np.ndarray], study: StudyConfig,
                  phase: str = "cnn") -> tuple[PerSite, dict[str, np.ndarray]] | str:
    """A network's federation without one site (``node``), for its leave-site-out score: the
    phase's rounds from ``initial`` with the other sites (their records and checkpoints in
    ``out-dir/<phase>_loso/<site>``). The strategy and the final weights, or why it cannot run
    (fewer than ``min_sites`` other sites)."""
    site = nodes[node]
    others = {n: s for n, s in nodes.items() if n != node}
    if len(others) < settings.min_sites:
        return f"{len(others)} other site(s), fewer than min-sites = {settings.min_sites}"
    title = "CNN" if phase == "cnn" else phase.capitalize()
    spec = settings.protocol.cnn if phase == "cnn" else settings.protocol.segmentation
    assert spec is not None  # a network's phase runs only with its section in the protocol
    progress(f"  {title} without {site}: {spec.rounds} round(s) with "
             f"{', '.join(sorted(others.values()))}")
    alone = dataclasses.replace(settings, out_dir=settings.out_dir / f"{phase}_loso" / site)
    strategy = cnn_strategy(alone, others, lambda line: progress(line.replace(
        f"{title} round", f"{title} without {site}, round", 1)), initial, phase=phase)
    return strategy, transport.train_rounds(strategy, initial, spec.rounds, settings.timeout_s,
                                            study)
