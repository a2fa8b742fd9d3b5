from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from cli.exit_codes import ExitCode
from cli.main import app
from harmonization.combat.design import CombatOptions, Design
from harmonization.combat.model import SiteTable, fit_combat
from tests.harmonization.test_combat import make_table

runner = CliRunner()


def _write(tmp_path: Path, suffix: str = ".csv") -> tuple[Path, pd.DataFrame, np.ndarray]:
    sites, covars, y = make_table(7, n_features=12)
    frame = covars.assign(case_id=[f"c{i}" for i in range(len(covars))])
    frame = pd.concat([frame, pd.DataFrame(y, columns=[f"f{j}" for j in range(12)])], axis=1)
    path = tmp_path / f"features{suffix}"
    frame.to_parquet(path) if suffix == ".parquet" else frame.to_csv(path, index=False)
    return path, covars, y


def test_harmonize_cli_equals_the_library_and_reports_the_site_effect(tmp_path: Path):
    path, covars, y = _write(tmp_path, ".parquet")
    out = tmp_path / "h.parquet"
    result = runner.invoke(app, [
        "harmonize", str(path), "--batch-col", "batch", "--site-col", "site",
        "--categorical", "sex", "--categorical", "stage", "--continuous", "age",
        "--min-batch-size", "8", "--min-cell", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    got = pd.read_parquet(out)
    design = Design.from_values(covars.batch, covars, ("sex", "stage"), ("age",))
    cov = {c: covars[c].tolist() for c in ("sex", "stage", "age")}
    sites = [SiteTable(s, y[g.index], g.batch.tolist(), {c: g[c].tolist() for c in cov})
             for s, g in covars.groupby("site")]
    model = fit_combat(sites, design, CombatOptions(min_batch_size=8, min_cell=3))
    expected = model.transform(y, covars.batch.tolist(), cov)
    np.testing.assert_allclose(got[[f"f{j}" for j in range(12)]].to_numpy(), expected,
                               rtol=1e-12)
    assert got.case_id.tolist() == [f"c{i}" for i in range(len(covars))]
    report = json.loads(out.with_suffix(".json").read_text())
    effect = report["site_effect"]
    assert effect["share_significant_before"] > 0.5 > effect["share_significant_after"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_harmonize_cli_refuses_bad_input_naming_it(tmp_path: Path):
    path, _, _ = _write(tmp_path)
    out = str(tmp_path / "h.csv")
    missing = runner.invoke(app, ["harmonize", str(path), "--batch-col", "scanner", "-o", out])
    assert missing.exit_code == ExitCode.CONFIG and "no column 'scanner'" in missing.output
    small = runner.invoke(app, ["harmonize", str(path), "--batch-col", "batch", "-o", out])
    assert small.exit_code == ExitCode.CONFIG and "batch 'b3' has 8" in small.output
    absent = runner.invoke(app, ["harmonize", str(tmp_path / "nope.csv"), "--batch-col", "b",
                                 "-o", out])
    assert absent.exit_code == ExitCode.CONFIG and "file not found" in absent.output


def test_excluded_columns_pass_through_untouched(tmp_path: Path):
    path, covars, _ = _write(tmp_path)
    frame = pd.read_csv(path).assign(label=np.arange(len(covars)) % 2)
    frame.to_csv(path, index=False)
    out = tmp_path / "h.csv"
    result = runner.invoke(app, ["harmonize", str(path), "--batch-col", "batch",
                                 "--site-col", "site", "--min-batch-size", "8",
                                 "--continuous", "age", "--exclude", "label", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "12 features" in result.output
    assert pd.read_csv(out).label.tolist() == frame.label.tolist()
