"""The CNN's aggregation (server/strategy.py), on Flower's own messages: the global model does
not depend on the order in which the sites' updates arrive."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.glm import ModelError
from common.messages import MessageType
from common.network import build_network, state_arrays
from common.protocol import CnnSpec, load_protocol
from common.wire import from_wire, to_wire, wire_nbytes
from server.strategy import cnn_strategy
from server.study import StudySettings

NODES = {11: "site_A", 12: "site_B", 13: "site_C"}


def updates(expected: dict[str, np.ndarray], protocol_hash: str) -> list[Message]:
    """Each site's train reply: the network's weights moved by a random step, and its number of
    examples."""
    rng = np.random.default_rng(3)
    out = []
    for node, examples in zip(NODES, (17, 29, 41), strict=True):
        request = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
        arrays = {k: (v + rng.normal(0, 0.1, v.shape).astype(v.dtype)
                      if v.dtype.kind == "f" else v) for k, v in expected.items()}
        out.append(Message(RecordDict({
            "arrays": ArrayRecord({k: Array(np.require(v, requirements="C"))
                                   for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": examples, "train_loss": 0.5}),
            "site": ConfigRecord({"name": NODES[node], "protocol_hash": protocol_hash})}),
            reply_to=request))
    return out


def test_the_global_model_does_not_depend_on_the_order_updates_arrive_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Flower makes messages inside a run only: this process plays a run's ServerApp
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 2)
    protocol = load_protocol("preset:spine_mri_t1w").model_copy(update={"cnn": CnnSpec(
        architecture="resnet10", crop_size=(16, 16, 8), batch_size=8, rounds=1)})
    expected = state_arrays(build_network(protocol.cnn, protocol.task.kind))
    replies = updates(expected, protocol.content_hash())
    models = []
    for order in (replies, replies[::-1], [replies[1], replies[2], replies[0]]):
        settings = StudySettings(protocol, tmp_path / f"study{len(models)}")
        strategy = cnn_strategy(settings, NODES, lambda _: None, expected)
        strategy.started[1] = 0.0  # what configure_train records
        strategy.asked[1] = set(NODES.values())
        arrays, _ = strategy.aggregate_train(1, order)
        assert strategy.history.get(1, {}).keys() == set(NODES.values()), strategy.left_out
        models.append({k: v.numpy() for k, v in arrays.items()})
    for other in models[1:]:
        for name, weights in models[0].items():
            np.testing.assert_array_equal(other[name], weights, err_msg=name)


def test_flowers_aggregated_metrics_sum_counts_and_average_the_rest(tmp_path: Path):
    """Flower averages every metric weighted by num-examples; a count averaged (25.36 crops)
    means nothing, so the study's strategies sum counts, and keep -1 where a site withheld
    one."""
    from server.strategy import sum_counts

    def reply(n: int, auc: float, test_n: int) -> RecordDict:
        return RecordDict({"metrics": MetricRecord({"num-examples": n, "global_test_auc": auc,
                                                    "global_test_n": test_n,
                                                    "global_test_n_positive": test_n // 2})})

    merged = sum_counts([reply(10, 0.8, 12), reply(30, 0.6, 20)], "num-examples")
    assert merged["global_test_auc"] == pytest.approx(0.65)
    assert merged["global_test_n"] == 32 and merged["global_test_n_positive"] == 16
    withheld = sum_counts([reply(10, 0.8, 12), reply(30, 0.6, -1)], "num-examples")
    assert withheld["global_test_n"] == -1
    protocol = load_protocol("preset:spine_mri_t1w").model_copy(update={"cnn": CnnSpec()})
    strategy = cnn_strategy(StudySettings(protocol, tmp_path), NODES, lambda _: None,
                            state_arrays(build_network(protocol.cnn, protocol.task.kind)))
    assert strategy.train_metrics_aggr_fn is sum_counts  # type: ignore[attr-defined]
    assert strategy.evaluate_metrics_aggr_fn is sum_counts  # type: ignore[attr-defined]


def test_half_precision_weights_travel_both_ways_and_are_averaged_in_float32(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 2)
    spec = CnnSpec(architecture="resnet10", crop_size=(16, 16, 8), batch_size=8, rounds=1)
    protocol = load_protocol("preset:spine_mri_t1w").model_copy(update={"cnn": spec})
    half = protocol.model_copy(update={"cnn": spec.model_copy(update={"transfer": "float16"})})
    expected = state_arrays(build_network(spec, protocol.task.kind))
    models = {}
    for name, chosen in (("float32", protocol), ("float16", half)):
        replies = updates(expected, chosen.content_hash())
        if name == "float16":  # as the sites send them (client/app.py)
            for reply in replies:
                reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in to_wire(
                    {k: a.numpy() for k, a in reply.content["arrays"].items()}, "float16").items()})
        strategy = cnn_strategy(StudySettings(chosen, tmp_path / name), NODES, lambda _: None,
                                expected)
        # the global model leaves in the protocol's precision, and stays float32 here
        start = ArrayRecord({k: Array(v) for k, v in expected.items()})
        grid = SimpleNamespace(get_node_ids=lambda: list(NODES))
        sent = strategy.configure_train(1, start, ConfigRecord({}), grid)
        assert sent and all(
            m.content["arrays"][k].numpy().dtype == (np.float16 if name == "float16"
                                                     and v.dtype.kind == "f" else v.dtype)
            for m in sent for k, v in expected.items())
        assert all(v.numpy().dtype == expected[k].dtype for k, v in start.items())
        strategy.asked[1] = set(NODES.values())
        arrays, _ = strategy.aggregate_train(1, replies)
        assert strategy.history.get(1, {}).keys() == set(NODES.values()), strategy.left_out
        models[name] = {k: v.numpy() for k, v in arrays.items()}
    wire = wire_nbytes(to_wire(expected, "float16"))
    assert wire <= 0.52 * wire_nbytes(expected)
    for name, weights in models["float32"].items():
        assert models["float16"][name].dtype == weights.dtype, name
        np.testing.assert_allclose(models["float16"][name], weights, rtol=2e-3, atol=2e-3,
                                   err_msg=name)
    # a float32 update where the protocol says float16 is refused, by name
    strategy = cnn_strategy(StudySettings(half, tmp_path / "refused"), NODES, lambda _: None,
                            expected)
    strategy.started[1] = 0.0
    strategy.asked[1] = set(NODES.values())
    mixed = updates(expected, half.content_hash())
    strategy.aggregate_train(1, mixed)
    assert {e["site"] for e in strategy.left_out} == set(NODES.values())
    assert all("float32" in e["reason"] and "float16" in e["reason"] for e in strategy.left_out)


def test_weights_beyond_half_precision_are_refused_by_name():
    weights = {"conv.weight": np.array([1.0, 7e4], np.float32), "bn.num_batches": np.array(3)}
    with pytest.raises(ModelError, match="'conv.weight' holds 7e\\+04, beyond float16"):
        to_wire(weights, "float16")
    back = from_wire(to_wire({"w": np.array([0.1, -2.5], np.float32)}, "float16"))
    assert back["w"].dtype == np.float32
    np.testing.assert_allclose(back["w"], [0.1, -2.5], rtol=1e-3)
    assert to_wire(weights, "float32")["conv.weight"].dtype == np.float32


@pytest.mark.parametrize("aggregator", ["fedavg", "fedprox", "fedadam", "fedmedian",
                                        "trimmed_mean", "krum"])
def test_the_segmentation_network_is_aggregated_by_any_of_the_cnns_strategies(
        aggregator: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from common.protocol import SegmentationSpec
    from common.segmenter import build_segmenter

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 2)
    spec = SegmentationSpec(channels=(4, 8), patch_size=(16, 16, 8), aggregator=aggregator)
    protocol = load_protocol("preset:spine_mri_t1w").model_copy(update={"segmentation": spec})
    expected = state_arrays(build_segmenter(spec, 3, (4.0, 1.0, 1.0)))
    strategy = cnn_strategy(StudySettings(protocol, tmp_path), NODES, lambda _: None, expected,
                            phase="segmentation")
    assert type(strategy).__name__.endswith({"fedavg": "FedAvg", "fedprox": "FedProx",
                                             "fedadam": "FedAdam", "fedmedian": "FedMedian",
                                             "trimmed_mean": "FedTrimmedAvg",
                                             "krum": "Krum"}[aggregator])
    start = ArrayRecord({k: Array(v) for k, v in expected.items()})
    sent = strategy.configure_train(1, start, ConfigRecord({}),
                                    SimpleNamespace(get_node_ids=lambda: list(NODES)))
    assert len(sent) == len(NODES)
    arrays, _ = strategy.aggregate_train(1, updates(expected, protocol.content_hash()))
    assert arrays is not None and set(arrays) == set(expected)
    assert (tmp_path / "segmentation" / "global_round_001.npz").is_file()  # its own folder
    assert (tmp_path / "segmentation_progress.json").is_file()
