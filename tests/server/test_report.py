"""The multicentre report from a study folder, without running a study: a regression study's
files (plasma-cell infiltration) made by hand in the shapes the ServerApp writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.errors import ConfigError
from harmonization.images import PERCENTILES, combine_image_sums, scanner_sums
from server.phases.images import ImagesSummary
from server.phases.validation import pool_sites
from server.report import build_report, write_report
from tests.conftest import image_measure


def _metrics(r: float, n: int) -> dict[str, float]:
    return {"n": n, "r": r, "r_low": r - 0.2, "r_high": min(r + 0.15, 0.99), "r_p": 0.01,
            "spearman": r - 0.02, "spearman_low": r - 0.25, "spearman_high": r + 0.1,
            "spearman_p": 0.02, "mae": 9.5, "rmse": 12.0, "bias": -1.5, "loa_low": -25.0,
            "loa_high": 22.0}


def regression_study(folder: Path) -> None:
    sites = {"site_A": 12, "site_B": 21, "site_C": 33}
    results = {s: {"n_test": n, "n_positive": 0, "comparisons": {},
                   "metrics": {"federated": _metrics(0.7, n), "leave-site-out": _metrics(0.6, n),
                               **{f"local {o}": _metrics(0.5 + 0.05 * i, n)
                                  for i, o in enumerate(sites)}}}
               for s, n in sites.items()}
    model = {"harmonized": False, "loss": "gaussian", "penalty": "lasso", "failed": {},
             "sites": results, "pooled": pool_sites(results, "gaussian"),
             "local_models": {s: {} for s in sites},
             "training_sets": {"federated": {
                 "sites": list(sites), "lambdas": [1.0, 0.1, 0.01], "cv_loss": [3.0, 2.0, 2.5],
                 "chosen": 1,
                 "model": {"features": ["f1", "f2", "f3"], "coefficients": [0.5, 0.0, -0.2]}}}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "handshake.json").write_text(json.dumps({
        "sites": [{"site": s, "status": "ok", "protocol_hash": "ab" * 32, "n_usable": n * 3,
                   "skipped": "", "label_counts": ""} for s, n in sites.items()],
        "excluded": {}, "go_on": True, "reason": ""}))
    (folder / "model.json").write_text(json.dumps({"models": [model]}))
    (folder / "study.json").write_text(json.dumps({"status": "done", "until": "model",
                                                   "reason": ""}))


def test_a_regression_study_reports_pearson_r_pooled_on_fisher_z(tmp_path: Path) -> None:
    regression_study(tmp_path)
    report = build_report(tmp_path)
    section = report["models"][0]
    assert section["metric"] == "Pearson r" and "threshold_rows" not in section
    assert [r["site"] for r in section["regression_rows"]] == ["site_A", "site_B", "site_C"]
    assert section["rows"][0]["federated"] == "0.700 [0.500, 0.850]"
    pooled = {p["model"]: p for p in section["pooled"]}
    # three sites with r = 0.7: Fisher z pooling gives back 0.7 with no heterogeneity
    assert pooled["federated"]["estimate"] == "0.700" and pooled["federated"]["i2"] == "0%"
    assert section["selected"] == ["f1", "f3"]
    paths = write_report(tmp_path)
    html = paths["html"].read_text()
    assert "Pearson r" in html and "Bland-Altman" in html and html.count("<img ") >= 5
    rows = paths["csv"].read_text().splitlines()
    assert "site_B,raw,federated,r,0.7" in rows


def test_a_stopped_study_still_reports_what_it_has(tmp_path: Path) -> None:
    regression_study(tmp_path)
    (tmp_path / "model.json").unlink()
    (tmp_path / "study.json").write_text(json.dumps({
        "status": "stopped", "until": "cnn", "reason": "ComBat round 1: 1 site left"}))
    html = write_report(tmp_path)["html"].read_text()
    assert "Study stopped: ComBat round 1: 1 site left" in html and "site_C" in html


def test_a_folder_without_a_study_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no handshake.json"):
        build_report(tmp_path)
    with pytest.raises(ConfigError, match="not a folder"):
        build_report(tmp_path / "missing")


def test_the_image_harmonization_shows_each_scanner_against_the_standard(tmp_path: Path) -> None:
    regression_study(tmp_path)
    line = np.linspace(0, 250, len(PERCENTILES))
    sums = {"site_A": scanner_sums([image_measure("GE", line * 0.8, 2.0, (0.7, 0.7, 3.0))] * 6,
                                   5),
            "site_B": scanner_sums([image_measure("Siemens", line, 3.0, (0.9, 0.9, 4.0))] * 9
                                   + [image_measure("Philips", line)] * 2, 5)}
    standard = combine_image_sums(sums, 250.0, match_resolution=True)
    (tmp_path / "images.json").write_text(json.dumps(ImagesSummary(
        standard, {"site_C": "query.image_landmarks: no reply within 60 s"}).to_json()))
    section = build_report(tmp_path)["images"]
    assert [r["scanner"] for r in section["rows"]] == ["GE", "Siemens", "study standard"]
    assert section["rows"][-1]["images"] == 15 and section["rows"][0]["p99"] == "200.0"
    assert section["left_out"] == {"site_B": "Philips"}
    assert [(r["noise"], r["spacing (mm)"]) for r in section["rows"]] == [
        ("2.00", "0.70 x 0.70 x 3.00"), ("3.00", "0.90 x 0.90 x 4.00"),
        ("not matched", "0.90 x 0.90 x 4.00 (target)")]
    html = write_report(tmp_path)["html"].read_text()
    assert "Image harmonization (federated histogram standardization)" in html
    assert "did not shape the standard" in html and "no reply within 60 s" in html
    assert "the targets in the last row" in html


@pytest.mark.parametrize(("covbat", "said"), [
    ({"status": "done", "components": 3, "explained": 0.951, "pct_var": 0.95, "n_pc": 0},
     "3 leading principal components (95% of their variance)"),
    ({"status": "not run", "reason": "CovBat round 1: 1 site(s) answered"},
     "CovBat did not run: CovBat round 1: 1 site(s) answered. The sites applied ComBat alone."),
    ({"status": "off"}, None)])
def test_the_harmonization_section_says_what_covbat_did(tmp_path: Path, covbat: dict,
                                                        said: str | None) -> None:
    regression_study(tmp_path)
    (tmp_path / "combat.json").write_text(json.dumps({
        "status": "done", "batches": ["GE", "Siemens"], "shared_batches": [],
        "covariates": {"categorical": [], "continuous": ["age"], "estimation_only": ["pci"]},
        "covbat": covbat, "harmonized_rows": {"site_A": 40}, "failed": {}}))
    html = write_report(tmp_path)["html"].read_text()
    assert "Scanners: GE, Siemens." in html
    if said is None:
        assert "CovBat" not in html
    else:
        assert said in html


def test_the_harmonization_section_shows_each_sites_scanner_diagnostic(tmp_path: Path) -> None:
    regression_study(tmp_path)
    (tmp_path / "combat.json").write_text(json.dumps({
        "status": "done", "batches": ["GE", "Siemens", "Philips"], "shared_batches": [],
        "covariates": {"categorical": [], "continuous": [], "estimation_only": []},
        "covbat": {"status": "done", "components": 3, "explained": 0.95},
        "harmonized_rows": {"site_A": 40, "site_B": 30}, "failed": {},
        "scanner_features": {"site_A": None,
                             "site_B": {"tested": 107, "before": 0.3364, "after": 0.0467}}}))
    html = write_report(tmp_path)["html"].read_text()
    section = html[html.index("Features that differ between a site's own scanners"):]
    assert "after ComBat and CovBat" in section
    row = section[section.index("<td>site_B</td>"):]
    assert row.index("107") < row.index("33.6%") < row.index("4.7%") < row.index("</tr>")
    row = section[section.index("<td>site_A</td>"):]
    assert row.index("not measured: one scanner at the site") < row.index("</tr>")


def test_the_harmonization_section_sets_raw_and_harmonized_validation_side_by_side(
        tmp_path: Path) -> None:
    regression_study(tmp_path)
    models = json.loads((tmp_path / "model.json").read_text())["models"]
    harmonized = json.loads(json.dumps(models[0]))
    harmonized["harmonized"] = True
    for result in harmonized["sites"].values():
        result["metrics"]["leave-site-out"]["r"] = 0.75
    (tmp_path / "model.json").write_text(json.dumps({"models": [models[0], harmonized]}))
    (tmp_path / "combat.json").write_text(json.dumps({
        "status": "done", "batches": ["GE"], "shared_batches": [],
        "covariates": {"categorical": [], "continuous": [], "estimation_only": []},
        "harmonized_rows": {}, "failed": {}}))
    section = build_report(tmp_path)["harmonization_change"]
    assert section["metric"] == "Pearson r"
    assert section["rows"][0] == {
        "site": "site_A", "federated_raw": "0.700", "federated_harmonized": "0.700",
        "federated_change": "0.000", "loso_raw": "0.600", "loso_harmonized": "0.750",
        "loso_change": "0.150"}
    html = write_report(tmp_path)["html"].read_text()
    assert "What harmonization changed at each site" in html
    assert "leave-site-out, harmonized" in html


def test_each_site_gets_the_model_its_own_cross_validation_recommends(tmp_path: Path) -> None:
    regression_study(tmp_path)
    study = json.loads((tmp_path / "model.json").read_text())
    sites = study["models"][0]["sites"]
    sites["site_A"]["update"] = {"choice": "revised 0.3", "deviance": {
        "federated": 41.5, "recalibrated": 40.0, "revised 0.3": 38.25, "revised 10": 39.0,
        "local": None}}
    sites["site_B"]["update"] = {"choice": "local", "deviance": {"federated": 20.0,
                                                                 "local": 18.0}}
    (tmp_path / "model.json").write_text(json.dumps(study))
    rows = build_report(tmp_path)["models"][0]["rows"]
    assert rows[0]["recommended"] == (
        "the federated model revised (its coefficients refitted with an L2 penalty of 0.3 x the "
        "rows towards them): the least cross-validated deviance (federated 41.5, recalibrated "
        "40.0, revised 0.3 38.2, local not fitted)")
    assert rows[1]["recommended"].startswith("its local-only model: the least")
    assert rows[2]["recommended"] == ""  # no update at site_C
    assert "recommended at the site, and why" in write_report(tmp_path)["html"].read_text()


def test_repeated_splits_name_a_site_scored_on_fewer_splits(tmp_path: Path) -> None:
    regression_study(tmp_path)
    cell = {"mean": 0.8, "sd": 0.05}
    (tmp_path / "repeats.json").write_text(json.dumps({
        "metric": "AUC", "finished": 5, "stopped": {},
        "sites": {"site_A": {"federated": {**cell, "n": 2}, "local": {**cell, "n": 2}},
                  "site_B": {"federated": {**cell, "n": 5}, "local": {**cell, "n": 4}}}}))
    html = write_report(tmp_path)["html"].read_text()
    assert "At site_A only 2 of the 5 finished splits scored a model" in html
    assert "At site_B only" not in html  # one of its models was scored on all five


def test_the_harmony_section_gives_the_mixing_before_and_after(tmp_path: Path) -> None:
    regression_study(tmp_path)
    (tmp_path / "harmony.json").write_text(json.dumps({
        "status": "done", "components": 10, "explained": 0.83, "scanners": ["a", "b", "c"],
        "dropped": ["tiny"], "clusters": 7, "iterations": 4, "rounds": 27,
        "cluster_mixing": {"before": 1.21, "after": 2.05, "ceiling": 2.9},
        "sites": {"site_A": {"scanners": 1, "lisi_before": 1.0, "lisi_after": 1.0},
                  "site_B": {"scanners": 2, "lisi_before": 1.12, "lisi_after": 1.61}},
        "failed": {"site_C": "no CNN embeddings"}}))
    html = write_report(tmp_path)["html"].read_text()
    section = html[html.index("Harmony on the CNN"):]
    assert "(83% of their variance)" in section
    assert "7 clusters, 4 iteration(s) in 27 rounds" in section
    assert section.index("1.210 before") < section.index("2.050 after")
    row = section[section.index("<td>site_B</td>"):]
    assert row.index("1.120") < row.index("1.610") < row.index("</tr>")
    assert "left as they were: tiny" in section and "no CNN embeddings" in section
    (tmp_path / "harmony.json").write_text(json.dumps({
        "status": "stopped", "reason": "round 'ridge': site_B: lost", "failed": {}}))
    assert "Harmony stopped: round &#39;ridge&#39;" in write_report(tmp_path)["html"].read_text()
