"""``myelofed demo``: the whole study in the simulation engine, ending with the per-site table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from common.synthetic import CohortSpec, make_sites, write_cohort
from server.phases.validation import summary_rows

pytestmark = pytest.mark.slow


def test_demo_runs_the_study_prints_every_sites_results_and_names_why_it_stops(
        tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    # the default cohort's sizes: smaller ones leave ComBat cells under its minimum of 5
    write_cohort(cohort, CohortSpec(make_sites((40, 70, 110), True)), workers=2)
    protocol = cohort / "study.yaml"
    study = yaml.safe_load(protocol.read_text())
    study["model"] = {"cv_folds": 4, "n_lambdas": 4, "screening_top_k": 12}  # a quicker fit
    del study["cnn"]  # the CNN phase has its own test (its crops would double this one's time)
    protocol.write_text(yaml.safe_dump(study))

    result = CliRunner().invoke(app, ["demo", "--cohort", str(cohort), "-o", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    models = json.loads((tmp_path / "d" / "study" / "model.json").read_text())["models"]
    metric, rows = summary_rows(models)
    assert metric == "auc" and [r["site"] for r in rows] == ["site_A", "site_B", "site_C"]
    for row in rows:
        assert row["site"] in result.output
        for key in ("local", "federated", "federated_combat", "site_updated", "leave_site_out",
                    "leave_site_out_combat"):
            assert row[key] is None or 0.0 <= row[key] <= 1.0
        assert row["federated"] is not None and f"{row['federated']:.3f}" in result.output
        assert row["site_updated"] is not None  # every site updated the federated model
        assert row["cnn"] is None
    # the reports are written by default and their paths printed
    for path in (tmp_path / "d" / "study" / "report.html",
                 *(cohort / "work" / s / "study" for s in ("site_A", "site_B", "site_C"))):
        assert path.exists()
    assert "multicentre report:" in result.output and result.output.count("site report (") == 3

    # sites A and B keep three cases each: the handshake excludes them (a count under 5 leaves a
    # site only as "under the minimum"); one site is left, fewer than min-sites = 2: the study
    # stops naming them (exit code 6). (Ten folds used to do this; folds of atoms leave no fold
    # under 5 rows.)
    for site in ("site_A", "site_B"):
        manifest = cohort / site / "manifest.csv"
        manifest.write_text("\n".join(manifest.read_text().splitlines()[:4]) + "\n")
    result = CliRunner().invoke(app, ["demo", "--cohort", str(cohort), "-o", str(tmp_path / "e")])
    assert result.exit_code == 6, result.output
    status = json.loads((tmp_path / "e" / "study" / "study.json").read_text())
    assert status["status"] == "stopped"
    assert "site_A: under the minimum usable cases" in status["reason"]
    assert "site_B: under the minimum usable cases" in status["reason"]
