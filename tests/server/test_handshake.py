from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.phases.handshake import handshake
from client.workspace import resolve_site
from common.errors import ConfigError
from common.payloads import SUPPRESSED, HandshakeReply
from common.protocol import load_protocol
from common.site_config import SiteConfig
from common.synthetic import CohortSpec, make_sites, write_cohort
from server.phases.handshake import check_handshake
from server.study import StudySettings


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root, CohortSpec(make_sites((12, 14, 16))), workers=1)
    return root


def _protocol_json(protocol) -> str:  # noqa: ANN001
    return json.dumps(protocol.model_dump(mode="json"))


def test_site_answers_counts_or_refuses_with_a_code(cohort: Path):
    protocol = load_protocol(cohort / "study.yaml")
    site = resolve_site({"partition-id": 1}, {"simulation-cohort": str(cohort)})
    assert site.site_name == "site_B"
    reply = handshake(site, _protocol_json(protocol), protocol.content_hash())
    assert (reply.status, reply.n_rows, reply.n_usable) == ("ok", 14, 14)
    n0, n1 = (int(part.split(":")[1]) for part in reply.label_counts.split(","))
    # a count of 1 to 4 leaves as SUPPRESSED (this site has 4 positives): it would say that a
    # patient of that kind exists
    assert (n0, n1) == (10, SUPPRESSED)
    assert handshake(site.model_copy(update={"min_patients": 1}), _protocol_json(protocol),
                     protocol.content_hash()).label_counts == "0:10,1:4"
    tampered = handshake(site, _protocol_json(protocol), "0" * 64)
    assert tampered.status == "refused" and tampered.code == "protocol_hash_mismatch"
    gone = SiteConfig(site_name="x", manifest=cohort / "nope.csv")
    refused = handshake(gone, _protocol_json(protocol), protocol.content_hash())
    assert refused.code == "manifest_unusable" and str(cohort) not in refused.reason
    with pytest.raises(ConfigError, match="partition 7 has no site"):
        resolve_site({"partition-id": 7}, {"simulation-cohort": str(cohort)})


def test_check_handshake_excludes_by_name_and_stops_below_min_sites(tmp_path: Path):
    settings = StudySettings(load_protocol("preset:spine_mri_t1w"), tmp_path, min_sites=2,
                             min_cases_per_site=10)
    h = settings.protocol.content_hash()
    ok = HandshakeReply("A", "ok", h, n_rows=30, n_usable=30)
    small = HandshakeReply("B", "ok", h, n_rows=8, n_usable=8)
    refused = HandshakeReply("C", "refused", h, "protocol_hash_mismatch", "altered")
    summary = check_handshake([ok, small, refused], {"node 9": "error 1: crashed"}, settings)
    assert not summary.go_on and "fewer than min-sites = 2" in summary.reason
    assert set(summary.excluded) == {"B", "C", "node 9"}
    assert "min-cases-per-site" in summary.excluded["B"]
    assert check_handshake([ok, ok], {}, settings).go_on


@pytest.mark.slow
def test_handshake_runs_in_flowers_simulation_engine(cohort: Path, tmp_path: Path):
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    settings = StudySettings(load_protocol(cohort / "study.yaml"), tmp_path, min_sites=3,
                             min_cases_per_site=10, timeout_s=120, until="handshake")
    run_simulation(server_app=make_server_app(settings), client_app=make_client_app(cohort),
                   num_supernodes=3, backend_config={"client_resources": {"num_cpus": 1}})
    summary = json.loads((tmp_path / "handshake.json").read_text())
    assert summary["go_on"] and summary["excluded"] == {}
    assert sorted((s["site"], s["n_usable"]) for s in summary["sites"]) == [
        ("site_A", 12), ("site_B", 14), ("site_C", 16)]
    assert json.loads((tmp_path / "study.json").read_text())["status"] == "done"
    assert not (tmp_path / "prepare.json").exists()  # until="handshake"


@pytest.mark.slow
def test_a_combat_every_site_refuses_does_not_run_and_the_study_goes_on(cohort: Path,
                                                                        tmp_path: Path):
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    # default ComBat guards: scanners of 5-8 training patients are below min_cell / batch size
    settings = StudySettings(load_protocol(cohort / "study.yaml"), tmp_path, min_sites=2,
                             min_cases_per_site=10, timeout_s=300)  # a busy machine: no silence
    try:
        run_simulation(server_app=make_server_app(settings),
                       client_app=make_client_app(cohort), num_supernodes=3,
                       backend_config={"client_resources": {"num_cpus": 1}})
    except Exception:  # noqa: BLE001 - the engine may re-raise the ServerApp's StudyStopped
        pass
    combat = json.loads((tmp_path / "combat.json").read_text())
    assert combat["status"] == "not run"
    assert combat["reason"].startswith("ComBat round 1: 0 site(s) answered")
    for site in ("site_A", "site_B", "site_C"):
        assert f"{site}: query.combat_design: error 400: HarmonizationError" in combat["reason"]
        assert "HarmonizationError" in combat["failed"][site]
    assert str(cohort) not in combat["reason"]  # no path crosses the network
    # the study went on to the model on raw features, where this tiny cohort stops it
    status = json.loads((tmp_path / "study.json").read_text())
    assert status["status"] == "stopped"
    assert status["reason"].startswith("model comoments: 0 site(s) answered")
    # the stopped run wrote its multicentre report, saying where it stopped
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"]["status"] == "stopped"
    assert "model comoments: 0 site(s) answered" in (tmp_path / "report.html").read_text()


def test_a_site_sends_no_sums_over_fewer_than_five_training_rows(tmp_path: Path):
    import pandas as pd

    from client.phases.radiomics import model_rows
    from client.workspace import PREPARED_FILE, study_dir
    from common.glm import ModelError

    protocol = load_protocol("preset:spine_mri_t1w")
    site = SiteConfig(site_name="tiny", manifest=tmp_path / "m.csv", work_dir=tmp_path)
    table = pd.DataFrame({"case_id": list("abcdef"), "batch": "s", "diagnosis": [0, 1] * 3,
                          "sex": "F", "age": 60.0, "f1": range(6),
                          "split": ["train"] * 4 + ["test"] * 2, "fold": [0, 1, 0, 1, -1, -1]})
    path = study_dir(site, protocol) / PREPARED_FILE
    path.parent.mkdir(parents=True)
    table.to_parquet(path)
    with pytest.raises(ModelError, match="has fewer than 5 training rows") as refused:
        model_rows(site, protocol, False, "train")
    assert "4" not in str(refused.value)  # the reason leaves the site: no count under 5
    x, y, _ = model_rows(site, protocol, False, "test")  # evaluation needs no minimum
    assert x.shape == (2, 1) and y.tolist() == [0.0, 1.0]
