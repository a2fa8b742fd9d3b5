"""The study over real Flower processes on loopback (a SuperLink, three SuperNodes, ``flwr run``)
gives the results of Flower's in-process simulation engine: same seed, same settings, same
phase reports and the same harmonized tables at every site."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from client.report import report_dir
from client.workspace import HARMONIZED_FILE, PREPARED_FILE, study_dir
from common.bundle import build_release, unpack
from common.protocol import ModelSpec, load_protocol
from common.site_config import SiteConfig, load_site_config
from common.synthetic import CohortSpec, make_sites, write_cohort
from harmonization.combat.design import CombatOptions
from server.federation import LocalFederation
from server.processes import processes_marked
from server.study import StudySettings
from tests.server.studies import write_site_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("flower-superlink") is None,
                       reason="flower-superlink is not on PATH (install flwr and activate the "
                              "environment that holds it)"),
]

APP_DIR = Path(__file__).resolve().parents[2]  # the repository: the Flower app flwr run bundles
SITES = ("site_A", "site_B", "site_C")
#: The last phase both engines run: the whole study by default. Measured here (2 CPUs, shared):
#: 26 message rounds (handshake, prepare, 3 ComBat rounds with own scanners, then per model 1
#: summary, 8-9 Newton rounds and 1 evaluation); its flwr run took 219-345 s (rounds of 5.5-12 s:
#: Flower's 3 s polls and a fresh ClientApp process per message), the whole test ~380 s.
#: MYELOFED_DEPLOYMENT_UNTIL=combat stops both engines after ComBat (5 rounds, ~50 s).
UNTIL = os.environ.get("MYELOFED_DEPLOYMENT_UNTIL", "model")
ROUND_TIMEOUT_S = 240.0  # the ServerApp's wait for a round's replies (a hang fails the study;
# the simulation's extraction of 102 cases takes over 120 s beside the 20-site load test)
#: The whole flwr run: a hang the ServerApp does not notice fails the test.
RUN_TIMEOUT_S = 900.0 if UNTIL == "model" else 400.0
#: Keys of timings, which differ between runs and are not compared.
TIMING_KEY = re.compile(r"(^|_)(time|times|seconds|elapsed|wall|duration)(_|$)|_s$")


def differences(a: Any, b: Any, path: str = "$", rel: float = 1e-6, abs_: float = 1e-6
                ) -> list[str]:
    """Where two JSON values differ: same keys, equal strings and booleans, numbers within
    ``rel``/``abs_``; keys of timings skipped. Replies arrive in any order, so a list of
    per-site records (dicts with a ``site`` key) is compared site by site."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}: keys only in the simulation: {sorted(set(a) - set(b))}, only in the "
               f"deployment: {sorted(set(b) - set(a))}"] if set(a) != set(b) else []
        for key in sorted(set(a) & set(b)):
            if not TIMING_KEY.search(key):
                out += differences(a[key], b[key], f"{path}.{key}", rel, abs_)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items in the simulation, {len(b)} in the deployment"]
        if all(isinstance(x, dict) and "site" in x for x in a + b):
            a, b = (sorted(x, key=lambda item: str(item["site"])) for x in (a, b))
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{path}[{i}]", rel, abs_)]
    numbers = (int, float)
    if (isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool)
            and not isinstance(b, bool)):
        return [] if math.isclose(a, b, rel_tol=rel, abs_tol=abs_) else [
            f"{path}: {a!r} in the simulation, {b!r} in the deployment"]
    return [] if type(a) is type(b) and a == b else [
        f"{path}: {a!r} in the simulation, {b!r} in the deployment"]


def test_differences_walks_json_and_ignores_order_of_sites_and_timings():
    sim = {"sites": [{"site": "A", "n": 1}, {"site": "B", "n": 2.0}], "wall_s": 3.0,
           "coef": [1.0, 2.0], "ok": True}
    dep = {"sites": [{"site": "B", "n": 2.0 + 1e-9}, {"site": "A", "n": 1}], "wall_s": 9.0,
           "coef": [1.0, 2.0], "ok": True}
    assert differences(sim, dep) == []
    assert differences(sim, {**dep, "coef": [2.0, 1.0]}) == [
        "$.coef[0]: 1.0 in the simulation, 2.0 in the deployment",
        "$.coef[1]: 2.0 in the simulation, 1.0 in the deployment"]
    assert differences(sim, {**dep, "ok": 1})  # a boolean is not a number
    assert differences({"a": 1}, {"b": 1})[0].startswith("$: keys only in the simulation: ['a']")


def test_the_study_over_real_processes_gives_the_simulations_results(tmp_path: Path):
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    # the data lives outside the repository: flwr run sends the repository's files to the sites
    assert APP_DIR not in tmp_path.resolve().parents
    cohort = tmp_path / "cohort"
    write_cohort(cohort, CohortSpec(make_sites((30, 34, 38), True)), workers=2)
    # the protocol travels to the ServerApp as a file; ~22 training rows a site: 3 CV folds;
    # every phase of the default protocol, without its N4 bias correction (each run would
    # spend about a minute of CPU on it, and it runs in-process alike in both engines)
    protocol = load_protocol(cohort / "study.yaml")
    protocol = protocol.model_copy(update={
        "model": ModelSpec(screening_top_k=10, cv_folds=3, n_lambdas=5),
        "standardization": protocol.standardization.model_copy(
            update={"bias_correction": None})})
    protocol_file = tmp_path / "protocol.yaml"
    protocol_file.write_text(yaml.safe_dump(protocol.model_dump(mode="json"), sort_keys=False))
    protocol = load_protocol(protocol_file)
    settings = StudySettings(protocol, tmp_path / "simulation", min_sites=3,
                             min_cases_per_site=10, timeout_s=ROUND_TIMEOUT_S, seed=1,
                             test_fraction=0.3, combat=CombatOptions(min_batch_size=3, min_cell=1),
                             until=UNTIL)

    # (a) Flower's simulation engine, in this process
    start = time.monotonic()
    run_simulation(server_app=make_server_app(settings),
                   # tiny synthetic sites: they allow cells of 1 (min_patients), as min_cell
                   client_app=make_client_app(cohort, min_patients=1),
                   num_supernodes=len(SITES),
                   backend_config={"client_resources": {"num_cpus": 1}})
    simulation_s = time.monotonic() - start

    # (b) real processes: each site has its own site config and work folder; the extraction
    # cache is copied over (its key is the protocol and the files' contents, not their paths)
    deploy = tmp_path / "deployment"
    deployed = dataclasses.replace(settings, out_dir=deploy / "out")
    run_config = deployed.to_run_config(str(protocol_file))
    assert StudySettings.from_run_config(run_config) == deployed
    site_configs = {}
    for site in SITES:
        work = deploy / "work" / site
        shutil.copytree(cohort / "work" / site / "cache", work / "cache")
        site_configs[site] = write_site_config(deploy / "sites" / f"{site}.toml", site,
                                               cohort / site / "manifest.csv", work,
                                               min_patients=1)
    # the coordinator runs a released bundle: one .fab, unpacked, which flwr run ships as is
    fab, digest = build_release(APP_DIR, deploy / "release")
    assert unpack(fab, deploy / "app") == digest
    with LocalFederation(deploy / "app", site_configs, deploy / "federation",
                         approved_apps=(digest,)) as federation:
        result = federation.run(run_config, timeout_s=RUN_TIMEOUT_S)
    logs = federation.report(lines=60)  # the logs outlive the processes
    survivors = processes_marked(federation.marker)
    assert not survivors, f"processes left running: {survivors}\n{logs}"
    assert result.ok, f"{result.summary()}\n{logs}"
    status_file = deployed.out_dir / "study.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else None
    assert status == {"status": "done", "until": UNTIL, "reason": ""}, f"{status}\n{logs}"
    # the reports, in deployment as in the demo: the coordinator's from the ServerApp, each
    # site's from its ClientApp (its templates travel in the app bundle), owner-only
    report = deployed.out_dir / "report.html"
    assert report.is_file() and report.stat().st_mode & 0o077 == 0, logs
    for site in SITES:
        html = report_dir(load_site_config(site_configs[site]), protocol) / "site_report.html"
        assert html.is_file(), f"{site}: no site report\n{logs}"
        assert "not written" not in (federation.folder / "logs" /
                                     f"supernode-{site}.log").read_text()

    rounds = len(re.findall(r"Receiving: query\.", (federation.folder / "logs" /
                                                     "supernode-site_A.log").read_text()))
    print(f"\nsimulation {simulation_s:.1f} s (with extraction); deployment: flwr run "
          f"{result.wall_s:.1f} s for {rounds} message rounds "
          f"({result.wall_s / max(rounds, 1):.1f} s a round)")

    # the phase reports: same keys, same strings, numbers within 1e-6
    reports = ["handshake.json", "prepare.json", "combat.json", "model.json"]
    for name in reports[:reports.index(f"{UNTIL}.json") + 1]:
        found = differences(json.loads((settings.out_dir / name).read_text()),
                            json.loads((deployed.out_dir / name).read_text()))
        assert not found, f"{name} differs:\n" + "\n".join(found) + f"\n{logs}"

    # each site's local tables: the same rows in the same order, values within 1e-9
    tables = [name for name, phase in ((PREPARED_FILE, "prepare"), (HARMONIZED_FILE, "combat"))
              if settings.runs(phase)]
    for site in SITES:
        simulated = SiteConfig(site_name=site, manifest=cohort / site / "manifest.csv",
                               work_dir=cohort / "work" / site)
        for name in tables:
            try:
                pd.testing.assert_frame_equal(
                    pd.read_parquet(study_dir(simulated, protocol) / name),
                    pd.read_parquet(study_dir(load_site_config(site_configs[site]), protocol)
                                    / name),
                    check_exact=False, rtol=1e-9, atol=1e-9, obj=f"{site} {name}")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{logs}") from None
