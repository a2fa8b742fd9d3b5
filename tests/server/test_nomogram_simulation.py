"""The treatment-response study over Flower: the nomogram (the radiomics score combined with ISS
stage and age, fitted for every training set, equal to the same fit on the pooled rows), and the
multicentre and site reports of the study, rendered in headless Chromium."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.workspace import HARMONIZED_FILE, feature_columns
from common.glm import fit_logistic
from common.payloads import NOMOGRAM_L2
from common.protocol import ModelSpec, load_protocol
from common.selection.model import LinearModel
from common.selection.updating import candidates
from common.synthetic import CohortSpec, Task, make_sites, write_cohort
from harmonization.combat.design import CombatOptions
from server.study import StudySettings
from tests.server.studies import render_in_chromium

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def response_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """The response study on three small sites until the model phase: (cohort, out, protocol)."""
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    tmp_path = tmp_path_factory.mktemp("response")
    cohort = tmp_path / "cohort"
    write_cohort(cohort, CohortSpec(make_sites((30, 34, 38), True), Task.RESPONSE), workers=2)
    protocol = load_protocol(cohort / "study.yaml").model_copy(update={
        "model": ModelSpec(screening_top_k=8, cv_folds=3, n_lambdas=3,
                           clinical=("iss_stage", "age")), "cnn": None})
    settings = StudySettings(protocol, tmp_path / "out", min_sites=3, timeout_s=300, seed=2,
                             combat=CombatOptions(min_batch_size=3, min_cell=1), until="model")
    run_simulation(server_app=make_server_app(settings, lambda _: None),
                   # tiny synthetic sites: they allow cells of 1 (min_patients), as min_cell
                   client_app=make_client_app(cohort, min_patients=1), num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1}})
    return cohort, tmp_path / "out", protocol


def test_the_nomogram_equals_the_pooled_fit_and_is_scored_at_every_site(
        response_study: tuple[Path, Path, object]) -> None:
    cohort, out, protocol = response_study
    tmp_path = out.parent
    assert json.loads((tmp_path / "out" / "study.json").read_text())["status"] == "done"
    nomogram = json.loads((tmp_path / "out" / "nomogram.json").read_text())
    assert nomogram["status"] == "done" and nomogram["harmonized"] is True
    assert nomogram["terms"] == ["radiomics score", "iss_stage=II", "iss_stage=III", "age"]
    radiomics = next(m for m in json.loads((tmp_path / "out" / "model.json").read_text())
                     ["models"] if m["harmonized"])

    tables = {s: pd.read_parquet(cohort / "work" / s / "study" / protocol.short_hash /
                                 HARMONIZED_FILE) for s in ("site_A", "site_B", "site_C")}
    names = feature_columns(tables["site_A"], protocol)
    for set_name, fitted in nomogram["training_sets"].items():
        chosen = radiomics["training_sets"][set_name]["model"]
        score = LinearModel(np.array([names.index(f) for f in chosen["features"]]),
                            np.array(chosen["mean"]), np.array(chosen["sd"]),
                            np.array([chosen["intercept"], *chosen["coefficients"]]))
        train = pd.concat([t[t.split == "train"] for s, t in tables.items()
                           if s in fitted["sites"]])
        design = np.column_stack([score.score(train[names].to_numpy(float)),
                                  train.iss_stage == "II", train.iss_stage == "III",
                                  train.age]).astype(float)
        # the same objective on the pooled rows: sum of losses + n * l2 / 2 * |w|^2
        pooled = fit_logistic([(design, train.response.to_numpy(float))],
                              l2=len(train) * NOMOGRAM_L2)
        got = [fitted["intercept"], *fitted["coefficients"].values()]
        np.testing.assert_allclose(got, pooled, atol=1e-6, err_msg=set_name)
        ratio, low, high = fitted["odds_ratios"]["age"]
        assert ratio == pytest.approx(np.exp(pooled[-1])) and low < ratio < high
    for site, result in nomogram["sites"].items():
        assert set(result["metrics"]) == {"nomogram", "nomogram leave-site-out",
                                          "nomogram site-updated"}
        assert all(0.0 <= m["auc"] <= 1.0 for m in result["metrics"].values())
        # the federated nomogram updated at the site: kept there, with its site's choice
        kept = json.loads((cohort / "work" / site / "study" / protocol.short_hash / "report"
                           / "evaluation_nomogram.json").read_text())
        assert kept["models"]["nomogram site-updated"]["choice"] in candidates()


def test_the_multicentre_report_shows_every_site_and_model(
        response_study: tuple[Path, Path, object]) -> None:
    from server.report import write_report

    _, out, _ = response_study
    paths = write_report(out)
    report = json.loads(paths["json"].read_text())
    assert [m["label"] for m in report["models"]] == ["raw features",
                                                      "harmonized features"]
    for model in report["models"]:
        assert [r["site"] for r in model["rows"]] == ["site_A", "site_B", "site_C"]
        assert {p["model"] for p in model["pooled"]} <= {"federated", "site-updated",
                                                         "leave-site-out", "local"}
        assert len(model["threshold_rows"]) == 3
    assert report["nomogram"]["status"] == "done"
    assert set(report["nomogram"]["ratios"]) == {"radiomics score", "iss_stage=II",
                                                 "iss_stage=III", "age"}
    assert report["nomogram"]["ratio_name"] == "odds ratio"
    assert report["combat"]["covariates"]["estimation_only"] == ["response"]
    rows = paths["csv"].read_text().splitlines()
    assert rows[0] == "site,features,model,metric,value"
    assert any(r.startswith("site_B,harmonized,federated,auc,") for r in rows)
    assert any(r.startswith("site_C,harmonized,nomogram,auc,") for r in rows)
    html = paths["html"].read_text()
    assert html.count("<img ") >= 12 and "Forest plot" in html and "Nomogram" in html


def test_each_site_keeps_its_own_report(response_study: tuple[Path, Path, object]) -> None:
    cohort, _, protocol = response_study
    for site in ("site_A", "site_B", "site_C"):
        folder = cohort / "work" / site / "study" / protocol.short_hash / "report"
        report = json.loads((folder / "site_report.json").read_text())
        assert report["site"] == site and report["prepare"]["reply"]["status"] == "ok"
        assert [e["key"] for e in report["evaluations"]] == ["raw", "harmonized", "nomogram"]
        raw = report["evaluations"][0]
        assert {r["model"] for r in raw["rows"]} >= {"federated", "leave-site-out"}
        assert raw["comparisons"] and (folder / "site_report.html").stat().st_size > 10_000
        assert "Nomogram (federated)" in (folder / "site_report.html").read_text()
        # the ROC curves (its patients) are recorded here, never sent
        assert json.loads((folder / "evaluation_raw.json").read_text())["roc"]


def test_myelofed_report_renders_again_and_names_a_bad_folder(
        response_study: tuple[Path, Path, object], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    _, out, _ = response_study
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output and "report.csv" in result.output
    (tmp_path / "handshake.json").write_text("{not json")
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    said = result.output.replace("\n", "")  # rich wraps long paths
    assert result.exit_code == 2 and "handshake.json" in said and "not valid JSON" in said


def test_reports_render_in_headless_chromium(response_study: tuple[Path, Path, object]) -> None:
    """Every figure of the multicentre and of a site report loads, with no console error; a
    screenshot of each is saved next to it."""
    from server.report import write_report

    cohort, out, protocol = response_study
    render_in_chromium([write_report(out)["html"],
                        cohort / "work" / "site_B" / "study" / protocol.short_hash / "report" /
                        "site_report.html"])
