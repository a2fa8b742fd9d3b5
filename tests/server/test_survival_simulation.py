"""The progression-free survival study over Flower (issue 18): the penalized Cox model stratified
by site, fitted from the sites' terms, equals the same fit on the pooled rows in one process;
every site scores it with Harrell's and Uno's C, the time-dependent AUC and the Brier score; the
privacy guard passes every reply (the simulation runs with it) and no reply has an axis of a
site's patients (the shape audit); the nomogram equals the pooled fit; a site with every case
censored is excluded by name; the reports render."""

from __future__ import annotations

import json
from html import unescape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.workspace import HARMONIZED_FILE, PREPARED_FILE, feature_columns
from common.cox import fit_cox
from common.messages import MessageType
from common.payloads import NOMOGRAM_L2
from common.protocol import ModelSpec, load_protocol
from common.selection.batch import new_batch
from common.selection.model import LinearModel
from common.selection.pooled import run_in_process
from common.selection.screening import combine_comoments, screening_label, site_comoments
from common.selection.updating import candidates
from common.synthetic import CohortSpec, Task, make_sites, write_cohort
from server.study import StudySettings
from tests.server.studies import audit_mod, no_patient_axis, render_in_chromium

pytestmark = pytest.mark.slow
SITES = ("site_A", "site_B", "site_C")


def test_the_federated_cox_model_is_the_pooled_fit_and_every_site_scores_it(tmp_path: Path):
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    cohort = tmp_path / "cohort"
    write_cohort(cohort, CohortSpec(make_sites((36, 40, 44), True), Task.PFS), workers=2)
    # every case of a fourth site is censored: it is excluded by name, the study goes on
    write_cohort(tmp_path / "censored", CohortSpec(make_sites((20,), True), Task.PFS, seed=9),
                 workers=2)
    manifest = tmp_path / "censored" / "site_A" / "manifest.csv"
    censored = pd.read_csv(manifest).assign(pfs_event=0)
    censored["image"] = [str((manifest.parent / p).resolve()) for p in censored["image"]]
    censored["mask"] = [str((manifest.parent / p).resolve()) for p in censored["mask"]]
    (cohort / "site_D").mkdir()
    censored.to_csv(cohort / "site_D" / "manifest.csv", index=False)
    protocol = load_protocol(cohort / "study.yaml")
    protocol = protocol.model_copy(update={
        "model": ModelSpec(screening_top_k=8, cv_folds=3, n_lambdas=4,
                           clinical=("iss_stage", "age")),
        "standardization": protocol.standardization.without_study_standard(),
        "validation": protocol.validation.model_copy(update={"bootstrap": 50})})
    assert protocol.task.kind.value == "survival" and protocol.cnn is None
    settings = StudySettings(protocol, tmp_path / "out", min_sites=3, timeout_s=300, seed=3,
                             until="model")
    run_simulation(server_app=make_server_app(settings, lambda _: None),
                   # tiny synthetic sites: an ISS stage of fewer than 5 training patients
                   # would keep a site out of the nomogram's sums (its release ledger)
                   client_app=make_client_app(cohort, min_patients=1,
                                              mods=[audit_mod(tmp_path / "outgoing.jsonl")]),
                   num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1}})
    out = tmp_path / "out"
    assert json.loads((out / "study.json").read_text())["status"] == "done"
    prepare = json.loads((out / "prepare.json").read_text())
    # the shape audit: no array or list a site sent is as long as its patients
    sent = no_patient_axis(tmp_path / "outgoing.jsonl", prepare,
                           frozenset({len(protocol.validation.km_grid)}))
    assert {MessageType.MODEL_TERMS, MessageType.MODEL_EVALUATE} <= {e["type"] for e in sent}
    excluded = prepare["excluded"]
    assert excluded == {"site_D": "refused: no_events (every training case is censored: no "
                                  "event to fit the survival model on)"}, excluded
    raw = next(m for m in json.loads((out / "model.json").read_text())["models"]
               if not m["harmonized"])
    assert raw["loss"] == "cox"

    # the same screening, penalty path and cross-validation on the sites' rows in one process
    tables = {s: pd.read_parquet(cohort / "work" / s / "study" / protocol.short_hash /
                                 PREPARED_FILE) for s in SITES}
    names = feature_columns(tables["site_A"], protocol)
    rows = []
    for site in SITES:
        train = tables[site][tables[site].split == "train"]
        rows.append((train[names].to_numpy(float),
                     train[["pfs_months", "pfs_event"]].to_numpy(float),
                     train["fold"].to_numpy()))
    moments = combine_comoments([site_comoments(x, screening_label(y, "cox")) for x, y, _ in rows])
    batch = run_in_process(new_batch([moments], "cox", "lasso", 8, 4, 3), rows, [[0, 1, 2]])
    pooled = batch.model(0, protocol.model.lambda_rule)
    fitted = raw["training_sets"]["federated"]["model"]
    assert [names[i] for i in pooled.features] == fitted["features"]
    np.testing.assert_allclose(fitted["coefficients"], pooled.beta[1:], atol=1e-6)
    assert fitted["intercept"] == 0.0

    for site in SITES:
        result = raw["sites"][site]
        federated = result["metrics"]["federated"]
        assert 0.0 <= federated["c_harrell"] <= 1.0 and federated["n_events"] > 0
        assert [t for t, _ in federated["auc_at"]] == list(protocol.validation.times)
        assert {"federated", "leave-site-out"} <= set(result["metrics"])
    assert raw["pooled"]["federated"]["metric"] == "c_harrell"

    # the nomogram: the stratified Cox model of the radiomics score, ISS stage and age, equal
    # to the exact fit of the pooled rows (the same ridge), scored at every site
    nomogram = json.loads((out / "nomogram.json").read_text())
    assert nomogram["status"] == "done" and nomogram["ratio"] == "hazard_ratios"
    models = json.loads((out / "model.json").read_text())["models"]
    radiomics = next(m for m in models if m["harmonized"] == nomogram["harmonized"])
    file = HARMONIZED_FILE if nomogram["harmonized"] else PREPARED_FILE
    tables = {s: pd.read_parquet(cohort / "work" / s / "study" / protocol.short_hash / file)
              for s in SITES}
    for set_name, fitted in nomogram["training_sets"].items():
        chosen = radiomics["training_sets"][set_name]["model"]
        score = LinearModel(np.array([names.index(f) for f in chosen["features"]]),
                            np.array(chosen["mean"]), np.array(chosen["sd"]),
                            np.array([chosen["intercept"], *chosen["coefficients"]]))
        strata = []
        for site in fitted["sites"]:
            train = tables[site][tables[site].split == "train"]
            design = np.column_stack([score.score(train[names].to_numpy(float)),
                                      train.iss_stage == "II", train.iss_stage == "III",
                                      train.age]).astype(float)
            strata.append((design, train.pfs_months.to_numpy(), train.pfs_event.to_numpy()))
        exact = fit_cox(strata, l2=sum(len(d) for d, _, _ in strata) * NOMOGRAM_L2)
        np.testing.assert_allclose(list(fitted["coefficients"].values()), exact, atol=1e-6,
                                   err_msg=set_name)
        ratio, low, high = fitted["hazard_ratios"]["iss_stage=III"]
        assert ratio == pytest.approx(np.exp(exact[2])) and low < ratio < high
    for site in SITES:
        # each site updated the federated Cox model and nomogram on its own rows, by its own
        # cross-validated partial likelihood
        assert {"nomogram", "nomogram leave-site-out", "nomogram site-updated"} == set(
            nomogram["sites"][site]["metrics"])
        assert nomogram["sites"][site]["update"]["choice"] in candidates()
        assert sum("site-updated" in m["sites"][site]["metrics"] for m in models) == 1
        # the site's own baseline survival stays with it: its nomogram reads survival at 12
        # and 36 months from it
        kept = json.loads((cohort / "work" / site / "study" / protocol.short_hash / "report" /
                           "evaluation_nomogram.json").read_text())["models"]["nomogram"]
        assert list(kept["baseline_survival"]) == ["12", "24", "36"]
        assert 1 > kept["baseline_survival"]["12"] > kept["baseline_survival"]["36"] > 0
    html = unescape((out / "report.html").read_text())
    assert "Harrell's C" in html and "Kaplan-Meier by predicted risk group" in html
    assert "hazard ratios [95% CI]: radiomics score" in html
    render_in_chromium([out / "report.html", cohort / "work" / "site_B" / "study" /
                        protocol.short_hash / "report" / "site_report.html"])
