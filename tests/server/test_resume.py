"""A coordinator that fails in the middle of a study and is started again goes on from its
checkpoint: the handshake runs again, finished phases are read back instead of redone, and the
CNN goes on after its last saved round, with FedAdam's moments. The study's CNN runs with local
differential privacy: what leaves each site is noised as the protocol says, and each site's
spend survives the restart."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from common.messages import MessageType
from common.protocol import LocalDpSpec, load_protocol
from harmonization.combat.design import CombatOptions
from server.study import StudySettings, open_checkpoint
from tests.server.studies import small_study

pytestmark = pytest.mark.slow


class CoordinatorLost(RuntimeError):
    """Stands for the coordinator's process dying."""


DP = LocalDpSpec(epsilon=1.0, delta=1e-5, clipping_norm=0.001)


def message_log(path: Path, updates: Path):  # noqa: ANN201 - a Flower mod
    """Appends each message a site receives (type and CNN round) to ``path``, and for each CNN
    update as it leaves the site the spread of its float weights' change and the dtypes of its
    other weights to ``updates``."""
    def mod(msg, context, call_next):  # noqa: ANN001, ANN202
        study = msg.content.get("study") if msg.has_content() else None
        round_ = study.get("server-round", "") if study is not None else ""
        with path.open("a") as fh:
            fh.write(f"{msg.metadata.message_type} {round_}\n")
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
            sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            got = {k: v.numpy() for k, v in reply.content["arrays"].items()}
            change = np.concatenate([(got[k].astype(float) - sent[k]).ravel()
                                     for k in got if got[k].dtype.kind == "f"])
            with updates.open("a") as fh:
                fh.write(json.dumps({
                    "std": float(change.std()), "n": int(change.size),
                    "others": sorted({str(v.dtype) for v in got.values() if v.dtype.kind != "f"}),
                    "epsilon": reply.content["metrics"].get("dp_epsilon")}) + "\n")
        return reply
    return mod


def test_a_restarted_coordinator_goes_on_from_its_checkpoint(tmp_path: Path) -> None:
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    cohort, protocol = small_study(tmp_path, (30, 34, 38), rounds=3, aggregator="fedadam",
                                   local_dp=DP)
    out = tmp_path / "out"
    settings = StudySettings(protocol, out, min_sites=2, timeout_s=300, seed=1,
                             combat=CombatOptions(min_batch_size=3, min_cell=1))

    def crash_after_round_2(line: str) -> None:
        if line.strip().startswith("CNN round 2/3"):
            raise CoordinatorLost("the coordinator's machine went down")

    def study(progress, log: Path) -> None:  # noqa: ANN001
        run_simulation(server_app=make_server_app(settings, progress),
                       # tiny synthetic sites: they allow cells of 1 (min_patients), as min_cell
                       client_app=make_client_app(cohort, min_patients=1, mods=[
                           message_log(log, tmp_path / "updates.jsonl")]),
                       num_supernodes=3, backend_config={"client_resources": {"num_cpus": 1}})

    try:
        study(crash_after_round_2, tmp_path / "first.log")
    except Exception:  # noqa: BLE001 - whether Flower re-raises the ServerApp's error or not
        pass
    status = json.loads((out / "study.json").read_text())
    assert status["status"] == "failed" and "CoordinatorLost" in status["reason"]
    checkpoint = json.loads((out / "checkpoint.json").read_text())
    assert checkpoint["done"] == ["prepare", "combat", "model"] and checkpoint["cnn_round"] == 2
    finished = {name: (out / name).read_bytes()
                for name in ("prepare.json", "combat.json", "model.json")}
    before = moments(out)
    assert before.pop("round") == 2

    progress: list[str] = []
    study(progress.append, tmp_path / "second.log")
    assert json.loads((out / "study.json").read_text())["status"] == "done"
    assert any(line.startswith("resuming the study") for line in progress), progress
    # the sites were asked the handshake again, round 3 and the final evaluation: nothing else
    asked = sorted((tmp_path / "second.log").read_text().splitlines())
    assert asked == sorted(["query.handshake "] * 3 + ["train 3"] * 3 + ["evaluate "] * 3)
    assert all((out / name).read_bytes() == data for name, data in finished.items())
    cnn = json.loads((out / "cnn.json").read_text())
    assert sorted(cnn["history"]) == ["1", "2", "3"]  # rounds 1-2 read back, 3 trained now
    assert all(set(sites) == {"site_A", "site_B", "site_C"} for sites in cnn["history"].values())
    assert set(cnn["final"]) == {"site_A", "site_B", "site_C"}
    assert sorted(p.name for p in (out / "cnn").glob("*.npz")) == [
        f"global_round_{r:03d}.npz" for r in (1, 2, 3)] + ["optimizer.npz"]
    # round 3 went on from round 2's moments (m = b1 m + (1 - b1) d, v = b2 v + (1 - b2) d^2):
    # the update d that m implies gives v; moments started afresh (zeros) would not
    from flwr.serverapp.strategy import FedAdam

    b1, b2 = (inspect.signature(FedAdam).parameters[b].default for b in ("beta_1", "beta_2"))
    after = moments(out)
    assert after.pop("round") == 3
    floats = [k[4:] for k in after if k.startswith("m_t/") and after[k].dtype.kind == "f"]
    assert len(floats) > 10 and np.abs(before["m_t/" + floats[0]]).max() > 0
    for k in floats:
        d = (after[f"m_t/{k}"] - b1 * before[f"m_t/{k}"]) / (1 - b1)
        expected = b2 * before[f"v_t/{k}"] + (1 - b2) * d**2
        np.testing.assert_allclose(after[f"v_t/{k}"], expected, rtol=1e-3,
                                   atol=1e-6 * np.abs(expected).max(), err_msg=k)

    # every update left its site clipped and noised: next to the noise the clipped update is
    # tiny, so the spread of the change is the protocol's noise; integer counters untouched
    updates = [json.loads(line) for line in (tmp_path / "updates.jsonl").read_text().splitlines()]
    assert len(updates) == 9  # 3 sites x 3 rounds (round 3 after the restart)
    for u in updates:
        assert u["std"] == pytest.approx(DP.noise_std, rel=0.03) and u["n"] > 10_000
        assert u["others"] == ["int64"] and u["epsilon"] == DP.epsilon
    assert cnn["privacy"]["noise_std"] == DP.noise_std
    assert cnn["privacy"]["per_site"] == {  # rounds 1-2 read back, round 3 added
        s: {"rounds": 3, "epsilon": 3.0, "delta": pytest.approx(3e-5)}
        for s in ("site_A", "site_B", "site_C")}
    from server.report import write_report

    html = write_report(out)["html"].read_text()
    assert "Differential privacy of the sites' updates" in html

    # a finished study is not resumed: the same settings again start afresh
    again, resumed = open_checkpoint(settings)
    assert not resumed and again.done == [] and not (out / "cnn.json").exists()


def moments(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "cnn" / "optimizer.npz") as saved:
        return {k: saved[k] for k in saved.files}


def test_another_protocol_in_the_same_folder_starts_afresh(tmp_path: Path) -> None:
    protocol = load_protocol("preset:spine_mri_t1w")
    settings = StudySettings(protocol, tmp_path, until="model")
    first, resumed = open_checkpoint(settings)
    assert not resumed
    first.finish(tmp_path, "prepare")
    (tmp_path / "prepare.json").write_text("{}")
    again, resumed = open_checkpoint(settings.__class__(protocol, tmp_path, until="cnn",
                                                       timeout_s=30))
    assert resumed and again.done == ["prepare"]  # until and timeout may change
    other = settings.__class__(protocol, tmp_path, seed=7)
    fresh, resumed = open_checkpoint(other)
    assert not resumed and fresh.done == [] and not (tmp_path / "prepare.json").exists()


def test_the_segmentation_rounds_are_checkpointed_apart_from_the_cnns(tmp_path: Path) -> None:
    from common.protocol import SegmentationSpec

    protocol = load_protocol("preset:spine_mri_t1w").model_copy(
        update={"segmentation": SegmentationSpec(rounds=6)})
    settings = StudySettings(protocol, tmp_path, until="segmentation")
    checkpoint, _ = open_checkpoint(settings)
    checkpoint.set_rounds("segmentation", 4)
    checkpoint.save(tmp_path)
    again, resumed = open_checkpoint(settings)
    assert resumed and again.rounds_of("segmentation") == 4 and again.rounds_of("cnn") == 0
    assert again.done == []  # the phase is not finished: the rounds go on from round 4
