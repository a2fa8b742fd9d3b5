"""Phases 1-3 of the study in Flower's simulation engine, checked against in-process maths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.workspace import (
    HARMONIZED_FILE,
    IMAGE_STANDARD_FILE,
    PREPARED_FILE,
    feature_columns,
)
from common.messages import MessageType
from common.payloads import PrepareReply
from common.protocol import (
    CovbatSpec,
    HarmonizationSpec,
    HistogramSpec,
    ModelSpec,
    load_protocol,
)
from common.selection.pooled import fit_pooled
from common.synthetic import CohortSpec, make_sites, write_cohort
from harmonization.combat.design import CombatOptions
from harmonization.combat.model import SiteTable, fit_combat
from harmonization.covbat import fit_covbat
from server.phases.combat import combat_design
from server.study import StudySettings
from tests.server.studies import audit_mod, no_patient_axis

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("scanner_effects", [True, False], ids=["own-scanners", "shared-scanner"])
def test_federated_combat_over_flower_equals_the_in_process_fit(tmp_path: Path,
                                                               scanner_effects: bool):
    """With scanner effects every hospital has its own scanners (EB at the sites); without,
    one scanner model is shared by all three (moments combined and EB at the server), and
    CovBat's rounds follow ComBat's (four axes: no payload dimension a patient count)."""
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    cohort = tmp_path / "cohort"
    # sizes whose train/test/total counts match no other dimension a payload can have
    write_cohort(cohort, CohortSpec(make_sites((30, 34, 38), scanner_effects)), workers=2)
    protocol = load_protocol(cohort / "study.yaml")
    protocol = protocol.model_copy(update={
        "model": ModelSpec(screening_top_k=15, cv_folds=3, n_lambdas=5),  # ~22 training rows
        # the federated histogram standardization (off in the presets) runs over Flower too
        "standardization": protocol.standardization.model_copy(
            update={"histogram": HistogramSpec(scale=250.0)}),
        "harmonization": HarmonizationSpec(
            covbat=None if scanner_effects else CovbatSpec(n_pc=4))})
    combat = CombatOptions(min_batch_size=3, min_cell=1)
    settings = StudySettings(protocol, tmp_path / "out", min_sites=3, min_cases_per_site=10,
                             timeout_s=300, seed=1, test_fraction=0.3, combat=combat,
                             until="model")  # the CNN has its own test
    audit = tmp_path / "outgoing.jsonl"
    run_simulation(server_app=make_server_app(settings),
                   # tiny synthetic sites: they allow cells of 1 (min_patients), as min_cell
                   client_app=make_client_app(cohort, min_patients=1,
                                              mods=[audit_mod(audit)]),
                   num_supernodes=3, backend_config={"client_resources": {"num_cpus": 1}})

    prepare = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert prepare["go_on"] and prepare["excluded"] == {}
    assert sorted(s["n_train"] + s["n_test"] for s in prepare["sites"]) == [30, 34, 38]
    # the image harmonization: the standard from every training image, kept at every site
    standard = json.loads((tmp_path / "out" / "images.json").read_text())["standard"]
    assert sum(n for n, _ in standard["scanners"].values()) == sum(
        s["n_train"] for s in prepare["sites"])
    for site in ("site_A", "site_B", "site_C"):
        kept = json.loads((cohort / "work" / site / "study" / protocol.short_hash
                           / IMAGE_STANDARD_FILE).read_text())
        assert kept["landmarks"] == standard["landmarks"]
    report = json.loads((tmp_path / "out" / "combat.json").read_text())
    assert report["failed"] == {} and sorted(report["harmonized_rows"].values()) == [30, 34, 38]
    assert report["shared_batches"] == ([] if scanner_effects else ["reference"])
    assert report["covbat"] == ({"status": "off"} if scanner_effects else {
        "status": "done", "components": 4, "explained": report["covbat"]["explained"],
        "pct_var": 0.95, "n_pc": 4})

    work = cohort / "work"
    prepared = {s: pd.read_parquet(work / s / "study" / protocol.short_hash / PREPARED_FILE)
                for s in ("site_A", "site_B", "site_C")}
    names = feature_columns(prepared["site_A"], protocol)
    label = protocol.task.label_column
    train = {s: t[t.split == "train"] for s, t in prepared.items()}
    # the label is a covariate of the estimation (protect_outcome), never of the application
    tables = [SiteTable(s, t[names].to_numpy(float), t.batch.tolist(),
                        {**{c: t[c].tolist() for c in protocol.covariates.columns},
                         label: t[label].astype(int).tolist()})
              for s, t in train.items()]
    replies = [PrepareReply(**s) for s in prepare["sites"]]  # the replies the server saw
    design, _ = combat_design(protocol, replies)
    assert design.fit_only == (label,)
    model = (fit_combat(tables, design, combat) if scanner_effects
             else fit_covbat(tables, design, combat, n_pc=4))
    for site, table in prepared.items():
        got = pd.read_parquet(work / site / "study" / protocol.short_hash / HARMONIZED_FILE)
        expected = model.transform(table[names].to_numpy(float), table.batch.tolist(),
                                   {c: table[c].tolist() for c in protocol.covariates.columns})
        assert got.case_id.tolist() == table.case_id.tolist()
        np.testing.assert_allclose(got[names].to_numpy(float), expected, rtol=1e-9, atol=1e-9)
        assert not np.allclose(got[names].to_numpy(float), table[names].to_numpy(float))

    # privacy: nothing a site sent has a dimension (or a list length) of its number of patients
    # (the audit sits outside the sites' privacy guard: a second check, by another rule)
    sent = no_patient_axis(audit, prepare)
    assert {e["type"] for e in sent} >= {
        MessageType.HANDSHAKE, MessageType.IMAGE_LANDMARKS, MessageType.PREPARE,
        MessageType.COMBAT_DESIGN, *([] if scanner_effects else [MessageType.COVBAT_PRODUCTS]),
        MessageType.COMBAT_APPLY, MessageType.MODEL_SUMMARY, MessageType.MODEL_TERMS,
        MessageType.MODEL_EVALUATE}
    assert any(d > 100 for e in sent for shape in e["arrays"] for d in shape)  # arrays seen

    # phase 4: every training set's chosen model equals the same recipe run on the pooled rows
    models = json.loads((tmp_path / "out" / "model.json").read_text())["models"]
    assert [m["harmonized"] for m in models] == [False, True]
    # each site updated the federated model once, on the harmonized features it has
    assert [sorted(s for s, r in m["sites"].items() if "site-updated" in r["metrics"])
            for m in models] == [[], ["site_A", "site_B", "site_C"]]
    for model_json in models:
        source = HARMONIZED_FILE if model_json["harmonized"] else PREPARED_FILE
        tables = {s: pd.read_parquet(work / s / "study" / protocol.short_hash / source)
                  for s in ("site_A", "site_B", "site_C")}
        assert set(model_json["training_sets"]) == {"federated", "without site_A",
                                                    "without site_B", "without site_C"}
        for report in model_json["training_sets"].values():
            rows = [(t[t.split == "train"][names].to_numpy(float),
                     t[t.split == "train"][label].to_numpy(float),
                     t[t.split == "train"].fold.to_numpy()) for s, t in tables.items()
                    if s in report["sites"]]
            spec = protocol.model
            pooled, _ = fit_pooled(rows, "logistic", spec.penalty, spec.screening_top_k,
                                   spec.n_lambdas, spec.cv_folds, spec.lambda_rule)
            fitted = report["model"]
            assert fitted["features"] == [names[i] for i in pooled.features]
            np.testing.assert_allclose([fitted["intercept"], *fitted["coefficients"]], pooled.beta,
                                       atol=1e-6)
        assert set(model_json["local_models"]) == set(tables)
        for metrics in model_json["sites"].values():
            assert metrics["n_test"] > 0
            assert set(metrics["metrics"]) - {"site-updated"} == {
                "federated", "leave-site-out", "local site_A", "local site_B", "local site_C"}
            assert all(0.0 <= m["auc"] <= 1.0 for m in metrics["metrics"].values())
            federated = metrics["metrics"]["federated"]
            assert federated["auc_low"] <= federated["auc"] <= federated["auc_high"]
            if federated["tp"] is not None:  # withheld when a cell is under the minimum
                assert federated["tp"] + federated["fn"] == metrics["n_positive"]
                assert all(federated[c] == 0 or federated[c] >= protocol.validation.min_count
                           for c in ("tp", "fp", "tn", "fn"))
            else:
                assert federated["sensitivity"] is None and federated["fn"] is None
            assert federated["threshold"] == pytest.approx(
                model_json["training_sets"]["federated"]["prevalence"])
            # curves leave the site only in bins of at least the protocol's minimum count
            assert all(n >= protocol.validation.min_count
                       for n, *_ in federated["calibration_curve"])
            assert set(metrics["comparisons"]) == {f"federated vs {m}" for m in
                                                   metrics["metrics"] if m != "federated"}
        pooled = model_json["pooled"]["federated"]
        assert set(pooled["sites"]) == set(tables) and pooled["metric"] == "auc"
        assert pooled["pooled"] is None or 0 <= pooled["pooled"]["i2"] <= 1
    for kept in prepared.values():  # the folds are those of the training rows only
        assert (kept.fold[kept.split == "test"] == -1).all()
        assert set(kept.fold[kept.split == "train"]) == set(range(protocol.model.cv_folds))
        assert got.split.tolist() == table.split.tolist()
