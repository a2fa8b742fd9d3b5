"""A study with repeated splits (``validation.repeats``) over Flower: each site's cases tested
once across the splits, each split's ComBat and radiomics models run apart, the summary of every
model per site over the splits equal to the splits' own figures, the report's section and the
demo's table; a coordinator restarted between two splits goes on with the next."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.workspace import HARMONIZED_FILE, PREPARED_FILE
from common.protocol import ModelSpec, StudyProtocol, ValidationSpec, load_protocol
from common.synthetic import CohortSpec, make_sites, write_cohort
from harmonization.combat.design import CombatOptions
from server.phases.validation import summary_rows
from server.study import StudySettings

pytestmark = pytest.mark.slow

SITES = ("site_A", "site_B", "site_C")
REPEATS = 3


class CoordinatorLost(RuntimeError):
    """Stands for the coordinator's process dying."""


@pytest.fixture(scope="module")
def repeated_study(tmp_path_factory: pytest.TempPathFactory
                   ) -> tuple[Path, Path, StudyProtocol]:
    """The diagnosis study on three small sites, three splits, until the model phase; its
    coordinator fails as the last split starts and is started again."""
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    tmp_path = tmp_path_factory.mktemp("repeats")
    cohort = tmp_path / "cohort"
    write_cohort(cohort, CohortSpec(make_sites((30, 34, 38), True)), workers=2)
    protocol = load_protocol(cohort / "study.yaml")
    protocol = protocol.model_copy(update={
        "model": ModelSpec(screening_top_k=8, cv_folds=REPEATS - 1, n_lambdas=3),
        "validation": ValidationSpec(repeats=REPEATS, bootstrap=0), "cnn": None,
        # N4 off: quicker; the histogram standard stays (the later splits read it)
        "standardization": protocol.standardization.model_copy(
            update={"bias_correction": None})})
    protocol = StudyProtocol.model_validate(protocol.model_dump())
    settings = StudySettings(protocol, tmp_path / "out", min_sites=3, timeout_s=300, seed=4,
                             combat=CombatOptions(min_batch_size=3, min_cell=1), until="model")
    def study(progress: Callable[[str], None]) -> None:
        run_simulation(server_app=make_server_app(settings, progress),
                       # tiny synthetic sites: they allow cells of 1 (min_patients), as min_cell
                       client_app=make_client_app(cohort, min_patients=1), num_supernodes=3,
                       backend_config={"client_resources": {"num_cpus": 1}})

    def crash_at_the_last_split(line: str) -> None:
        if line.startswith(f"split {REPEATS}/{REPEATS}:"):
            raise CoordinatorLost("the coordinator's machine went down")

    try:
        study(crash_at_the_last_split)
    except Exception:  # noqa: BLE001 - whether Flower re-raises the ServerApp's error or not
        pass
    out = tmp_path / "out"
    assert json.loads((out / "study.json").read_text())["status"] == "failed"
    assert json.loads((out / "checkpoint.json").read_text())["done"] == [
        "prepare", "combat", "model", f"split 2/{REPEATS}"]
    progress: list[str] = []
    study(progress.append)
    assert f"split 2/{REPEATS}: done before the restart" in progress
    assert f"split {REPEATS}/{REPEATS}: preparation, ComBat and the radiomics models" in progress
    return cohort, out, protocol


def test_each_case_is_tested_once_and_each_split_trains_on_the_other_folds(
        repeated_study: tuple[Path, Path, StudyProtocol]) -> None:
    cohort, out, protocol = repeated_study
    assert json.loads((out / "study.json").read_text())["status"] == "done"
    for site in SITES:
        folder = cohort / "work" / site / "study" / protocol.short_hash
        tables = [pd.read_parquet((folder if r == 0 else folder / "repeats" / str(r))
                                  / PREPARED_FILE) for r in range(REPEATS)]
        tested = [set(t.case_id[t.split == "test"]) for t in tables]
        assert all(tested) and sum(len(t) for t in tested) == len(tables[0])
        assert set().union(*tested) == set(tables[0].case_id)
        for r, table in enumerate(tables):
            train = table[table.split == "train"]
            assert set(train.case_id) == set(table.case_id) - tested[r]
            # the cross-validation folds: the other splits' test folds
            for fold in sorted(set(train.fold)):
                others = [tested[s] for s in range(REPEATS) if s != r]
                assert set(train.case_id[train.fold == fold]) in others
            harmonized = pd.read_parquet(
                (folder if r == 0 else folder / "repeats" / str(r)) / HARMONIZED_FILE)
            assert list(harmonized.case_id) == list(table.case_id)
            if r:  # each split harmonizes on its own training rows
                first = pd.read_parquet(folder / HARMONIZED_FILE).set_index("case_id")
                column = "original_firstorder_Mean"
                assert not np.allclose(harmonized.set_index("case_id").loc[
                    first.index, column], first[column])


def test_the_summary_is_each_models_mean_over_the_splits(
        repeated_study: tuple[Path, Path, StudyProtocol]) -> None:
    _, out, _ = repeated_study
    summary = json.loads((out / "repeats.json").read_text())
    assert summary["finished"] == REPEATS and summary["stopped"] == {}
    assert summary["metric"] == "auc" and sorted(summary["sites"]) == list(SITES)
    folders = [out, *(out / "repeats" / str(r) for r in range(1, REPEATS))]
    per_split = [summary_rows(json.loads((f / "model.json").read_text())["models"])[1]
                 for f in folders]
    for site in SITES:
        for key in ("federated", "federated_combat", "site_updated", "leave_site_out"):
            found = [row[key] for rows in per_split for row in rows
                     if row["site"] == site and row[key] is not None]
            got = summary["sites"][site][key]
            assert got["n"] == len(found) == REPEATS, (site, key)
            assert got["mean"] == pytest.approx(np.mean(found))
            assert got["sd"] == pytest.approx(np.std(found, ddof=1))
            assert all(0.0 <= v <= 1.0 for v in found) and not math.isnan(got["mean"])


def test_the_report_shows_the_repeated_splits(
        repeated_study: tuple[Path, Path, StudyProtocol]) -> None:
    from server.report import write_report

    _, out, _ = repeated_study
    paths = write_report(out)
    section = json.loads(paths["json"].read_text())["repeats"]
    assert section["finished"] == section["total"] == REPEATS
    assert [r["site"] for r in section["rows"]] == list(SITES)
    assert section["headers"][:3] == ["site", "site alone", "federated"]
    assert all(r["best"] in ("site alone", "federated", "federated + ComBat", "site-updated")
               for r in section["rows"])
    html = paths["html"].read_text()
    assert "Repeated splits (3 of 3 finished)" in html and " ± " in html


def test_the_demo_prints_the_means_over_the_splits(
        repeated_study: tuple[Path, Path, StudyProtocol]) -> None:
    from rich.console import Console

    from cli.demo import repeats_table

    _, out, _ = repeated_study
    summary = json.loads((out / "repeats.json").read_text())
    console = Console(record=True, width=120)
    console.print(repeats_table(out))
    text = console.export_text()
    assert "Mean test AUC per site over 3 splits" in text
    federated = summary["sites"]["site_B"]["federated"]
    row = next(line for line in text.splitlines() if "radiomics, federated " in line)
    assert f"{federated['mean']:.3f} ± {federated['sd']:.3f}" in row
