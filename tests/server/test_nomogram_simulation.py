"""The treatment-response nomogram over Flower: the radiomics score combined with ISS stage and
age, fitted for every training set, equal to the same fit on the pooled rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.study import HARMONIZED_FILE, feature_columns
from common.glm import fit_logistic
from common.protocol import ModelSpec, load_protocol
from common.selection import LinearModel
from common.synthetic import CohortSpec, Task, make_sites, write_cohort
from harmonization.combat import CombatOptions
from server.app import NOMOGRAM_L2
from server.study import StudySettings

pytestmark = pytest.mark.slow


def test_the_nomogram_equals_the_pooled_fit_and_is_scored_at_every_site(tmp_path: Path) -> None:
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    cohort = tmp_path / "cohort"
    write_cohort(cohort, CohortSpec(make_sites((30, 34, 38), True), Task.RESPONSE), workers=2)
    protocol = load_protocol(cohort / "study.yaml").model_copy(update={
        "model": ModelSpec(screening_top_k=8, cv_folds=3, n_lambdas=3,
                           clinical=("iss_stage", "age")), "cnn": None})
    settings = StudySettings(protocol, tmp_path / "out", min_sites=3, timeout_s=300, seed=2,
                             combat=CombatOptions(min_batch_size=3, min_cell=1), until="model")
    run_simulation(server_app=make_server_app(settings, lambda _: None),
                   client_app=make_client_app(cohort), num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1}})

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
        assert fitted["odds_ratios"]["age"] == pytest.approx(np.exp(pooled[-1]))
    for site, result in nomogram["sites"].items():
        assert set(result["metrics"]) == {"nomogram", "nomogram leave-site-out"}
        assert all(0.0 <= m["auc"] <= 1.0 for m in result["metrics"].values())
