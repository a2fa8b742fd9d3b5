"""Load: a federation of 20 SuperNodes on loopback (TLS, node authentication, the fleet gateway,
each site's app allow-list) completes a study's first two phases, and every process ends."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from client.phases.prepare import prepare
from client.workspace import resolve_site
from common.protocol import load_protocol
from common.synthetic import CohortSpec, make_sites, write_cohort
from server.federation import LocalFederation
from server.processes import processes_marked
from server.study import StudySettings
from tests.server.studies import write_site_config

pytestmark = [pytest.mark.slow, pytest.mark.exclusive, pytest.mark.skipif(
    shutil.which("flower-superlink") is None, reason="flower-superlink is not installed")]

APP_DIR = Path(__file__).resolve().parents[2]
N_SITES = 20


def test_twenty_sites_complete_the_handshake_and_the_preparation(tmp_path: Path):
    cohort = tmp_path / "cohort"
    write_cohort(cohort, CohortSpec(make_sites((14,), True)), workers=2)
    # without the image phase: the sites' splits differ, so a study standard would differ from
    # the template's and every site would extract again (the phase has its own tests)
    mapping = yaml.safe_load((cohort / "study.yaml").read_text())
    mapping["standardization"].update(histogram=None, matching=None)
    protocol_file = tmp_path / "protocol.yaml"
    protocol_file.write_text(yaml.safe_dump(mapping))
    protocol = load_protocol(protocol_file)
    # one site's features, extracted once: every site reads the same cases (small data), and
    # the extraction cache is keyed by the protocol and the files' contents, not by the site
    template = resolve_site({"partition-id": 0}, {"simulation-cohort": str(cohort)})
    prepare(template, protocol, seed=0, test_fraction=0.3)
    sites = {}
    for k in range(N_SITES):
        name = f"site_{k:02d}"
        work = tmp_path / "work" / name
        shutil.copytree(template.cache_dir, work / "cache")
        sites[name] = write_site_config(tmp_path / "sites" / f"{name}.toml", name,
                                        template.manifest, work)
    settings = StudySettings(protocol, tmp_path / "out", min_sites=N_SITES,
                             min_cases_per_site=10, timeout_s=300, seed=0, until="prepare")
    # the sites at a lower priority, as if each had a machine of its own (see site_nice); the
    # SuperLink's state in memory: Flower's SQLite state fails a write that waited 5 s for its
    # lock, which 20 sites answering at once on 2 shared cores cause (a reply lost, or the
    # ServerApp's heartbeat and with it the run); on its own machine the coordinator's SuperLink
    # keeps its file (docs/how-to/deployment.md)
    with LocalFederation(APP_DIR, sites, tmp_path / "federation", ready_timeout_s=180,
                         site_nice=10, persistent=False) as federation:
        result = federation.run(settings.to_run_config(str(protocol_file)), timeout_s=900)
        report = federation.report(lines=30)
    assert result.ok, f"{result.summary()}\n{report}"
    assert processes_marked(federation.marker) == []
    handshake = json.loads((settings.out_dir / "handshake.json").read_text())
    assert handshake["go_on"] and handshake["excluded"] == {}
    assert sorted(s["site"] for s in handshake["sites"]) == sorted(sites)
    prepared = json.loads((settings.out_dir / "prepare.json").read_text())
    assert prepared["go_on"] and prepared["excluded"] == {}
    assert len({s["features_hash"] for s in prepared["sites"]}) == 1
    assert len({(s["n_train"], s["n_test"]) for s in prepared["sites"]}) == 1
