"""Local differential privacy on the CNN's updates: a site's float weights leave clipped and
noised as the protocol says, its integer weights untouched; an update that does not say it was
noised so is refused; the report gives each site's epsilon."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.protocol import CnnSpec, LocalDpSpec, load_protocol
from common.synthetic import CohortSpec, make_sites, write_cohort
from server.study import StudySettings

pytestmark = pytest.mark.slow

DP = LocalDpSpec(epsilon=1.0, delta=1e-5, clipping_norm=0.01)


def observe(path: Path):  # noqa: ANN201 - a Flower mod, outside the ClientApp's own
    """Writes, for each train reply as it leaves, the spread of the float weights' change and
    the integer weights' dtypes; site 2 drops its DP statement in round 2."""
    def mod(msg, context, call_next):  # noqa: ANN001, ANN202
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        got = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        change = np.concatenate([(got[k].astype(float) - sent[k]).ravel()
                                 for k in got if got[k].dtype.kind == "f"])
        record = {"partition": int(context.node_config["partition-id"]),
                  "round": int(msg.content["study"]["server-round"]), "std": float(change.std()),
                  "n": int(change.size),
                  "ints": sorted({str(v.dtype) for v in got.values() if v.dtype.kind != "f"}),
                  "epsilon": reply.content["metrics"].get("dp_epsilon")}
        with path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if record["partition"] == 2 and record["round"] == 2:
            del reply.content["metrics"]["dp_epsilon"]
        return reply
    return mod


def test_local_dp_noises_each_update_and_reports_the_epsilon(tmp_path: Path) -> None:
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app
    from server.report import write_report

    cohort = tmp_path / "cohort"
    write_cohort(cohort, CohortSpec(make_sites((22, 22, 22), True)), workers=2)
    protocol = load_protocol(cohort / "study.yaml").model_copy(update={"cnn": CnnSpec(
        architecture="resnet10", crop_size=(16, 16, 8), rounds=2, batch_size=8, local_dp=DP)})
    settings = StudySettings(protocol, tmp_path / "out", min_sites=2, timeout_s=300, seed=1,
                             radiomics=False)
    log = tmp_path / "updates.jsonl"
    run_simulation(server_app=make_server_app(settings, lambda _: None),
                   client_app=make_client_app(cohort, mods=[observe(log)]),
                   num_supernodes=3, backend_config={"client_resources": {"num_cpus": 1}})

    updates = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(updates) == 6  # 3 sites x 2 rounds
    for u in updates:  # the clipped update is tiny next to the noise: the spread is the noise
        assert u["std"] == pytest.approx(DP.noise_std, rel=0.03) and u["n"] > 10_000
        assert u["ints"] == ["int64"] and u["epsilon"] == DP.epsilon
    cnn = json.loads((settings.out_dir / "cnn.json").read_text())
    (refused,) = cnn["left_out"]
    assert (refused["round"], refused["site"], refused["kind"]) == (2, "site_C", "excluded")
    assert "not noised with the protocol's local DP" in refused["reason"]
    privacy = cnn["privacy"]
    assert privacy["epsilon_per_round"] == 1.0 and privacy["noise_std"] == DP.noise_std
    # site_C's refused update was sent all the same: it counts
    assert privacy["per_site"] == {s: {"rounds": 2, "epsilon": 2.0, "delta": 2e-5}
                                   for s in ("site_A", "site_B", "site_C")}
    html = write_report(settings.out_dir)["html"].read_text()
    assert "Differential privacy of the sites' updates" in html and "2.0" in html


def test_the_noise_follows_the_gaussian_mechanism():
    # sigma = 2 C sqrt(2 ln(1.25 / delta)) / epsilon
    assert DP.noise_std == pytest.approx(2 * 0.01 * np.sqrt(2 * np.log(1.25e5)))
    with pytest.raises(ValueError):
        LocalDpSpec(epsilon=2.0)  # the classical analysis holds for epsilon <= 1
