"""End to end through ``myelofed site check/extract``: a small cohort with one of every kind of
bad input. Each bad case gets its named reason, the good cases are extracted, the exit status
says some were skipped, and a second run is served from the cache."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from cli.exit_codes import ExitCode
from cli.main import app
from client.pipeline import read_features_metadata
from common.protocol import load_protocol
from tests.conftest import SHARED_DATA, make_volume

runner = CliRunner()

PROTOCOL_TOML = """
name = "bad-input-suite"
modality = "CT"
batch_column = "scanner"

[task]
kind = "classification"
label_column = "mrd"

[covariates]
continuous = ["age"]

[ingestion]
min_roi_voxels = 20
rtstruct_roi = "GTV_Mass_CT"

[standardization]
resegmentation_range = [-1000.0, 1000.0]

[radiomics]
bin_width = 10.0

[radiomics.feature_classes]
shape = []
firstorder = []
glcm = []
"""


def _save(image: sitk.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return str(path)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """A manifest with 3 good NIfTI cases and one case of every failure kind."""
    root = tmp_path_factory.mktemp("cohort")
    rows = ["case_id,image,mask,mrd,age,scanner,roi"]

    def add(case_id, image, mask, label="1", age="60", roi=""):
        rows.append(f"{case_id},{image},{mask},{label},{age},scannerA,{roi}")

    for i in range(3):
        img, msk = make_volume(seed=i)
        add(f"good{i}", _save(img, root / f"good{i}_img.nii.gz"),
            _save(msk, root / f"good{i}_msk.nii.gz"), label=str(i % 2))
    img, msk = make_volume(seed=9)
    good_img = _save(img, root / "base_img.nii.gz")
    good_msk = _save(msk, root / "base_msk.nii.gz")

    corrupt = root / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not an image" * 10)
    add("corrupt_nifti", corrupt, good_msk)
    truncated = root / "truncated.nii.gz"
    truncated.write_bytes(Path(good_img).read_bytes()[:300])
    add("truncated_nifti", truncated, good_msk)
    ungz = root / "truncated_raw.nii"
    ungz.write_bytes(gzip.decompress(Path(good_img).read_bytes())[:1000])
    add("truncated_raw_nifti", ungz, good_msk)

    shifted = sitk.Image(msk)
    shifted.SetSpacing((1.0, 1.0, 3.0))
    add("geometry_mismatch", good_img, _save(shifted, root / "shifted_msk.nii.gz"))
    empty = sitk.Image(msk.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(msk)
    add("empty_mask", good_img, _save(empty, root / "empty_msk.nii.gz"))
    tiny = sitk.Image(empty)
    tiny[3, 3, 3] = 1
    tiny[3, 4, 3] = 1
    add("tiny_mask", good_img, _save(tiny, root / "tiny_msk.nii.gz"))
    add("missing_file", root / "nowhere.nii.gz", good_msk)
    add("missing_label", good_img, good_msk, label="")
    add("non_numeric_label", good_img, good_msk, label="yes")
    add("bad_age", good_img, good_msk, age="sixty")
    add("dup", good_img, good_msk)
    add("dup", good_img, good_msk)
    # issue 20's bad inputs: each skipped by name where it used to crash, mislead or exhaust
    rows.append(f"wide_row,{good_img},{good_msk},1,60,scannerA,,extra")  # an unquoted comma
    add("nul_in_path", f"{good_img}\x00x", good_msk)
    values = sitk.GetArrayFromImage(img)
    values[5] = np.nan
    nan_img = sitk.GetImageFromArray(values)
    nan_img.CopyInformation(img)
    add("nan_voxels", _save(nan_img, root / "nan_img.nii.gz"), good_msk)
    from tests.client.test_limits import nifti_bomb
    nifti_bomb(root / "bomb.nii.gz", (1024, 1024, 512))
    add("voxel_bomb", root / "bomb.nii.gz", good_msk)

    expected = {
        "corrupt_nifti": "image_unreadable",
        "truncated_nifti": "image_unreadable",
        "truncated_raw_nifti": "image_unreadable",
        "geometry_mismatch": "geometry_mismatch",
        "empty_mask": "empty_mask",
        "tiny_mask": "mask_too_small",
        "missing_file": "file_missing",
        "missing_label": "label_missing",
        "non_numeric_label": "label_invalid",
        "bad_age": "covariate_invalid",
        "dup": "duplicate_case_id",
        "wide_row": "missing_field",
        "nul_in_path": "file_missing",
        "nan_voxels": "non_finite_voxels",
        "voxel_bomb": "resource_limit",
    }
    ct = SHARED_DATA / "sts" / "dicom" / "STS_002" / "CT"
    if ct.exists():
        series = root / "dicom_truncated"
        shutil.copytree(ct / "image", series)
        victim = sorted(series.iterdir())[len(list(series.iterdir())) // 2]
        victim.write_bytes(victim.read_bytes()[:200])
        add("corrupt_dicom", series, ct / "mask" / "RS.dcm")
        expected["corrupt_dicom"] = "image_unreadable"
        add("wrong_roi_name", ct / "image", ct / "mask" / "RS.dcm", roi="NotAnROI")
        expected["wrong_roi_name"] = "roi_not_found"
        add("dicom_good", ct / "image", ct / "mask" / "RS.dcm")
        other = SHARED_DATA / "sts" / "dicom" / "STS_008" / "CT" / "mask" / "RS.dcm"
        add("other_patients_rtstruct", ct / "image", other)
        expected["other_patients_rtstruct"] = "mask_mismatch"

    (root / "manifest.csv").write_text("\n".join(str(r) for r in rows) + "\n")
    (root / "study.toml").write_text(PROTOCOL_TOML)
    return {"root": root, "expected": expected, "has_dicom": ct.exists()}


def _report(out: Path) -> dict:
    return json.loads((out / "ingestion_report.json").read_text())


def test_check_names_every_bad_case_and_exits_3(cohort):
    out = cohort["root"] / "check"
    result = runner.invoke(app, ["site", "check", "-p", str(cohort["root"] / "study.toml"),
                                 "-m", str(cohort["root"] / "manifest.csv"), "-o", str(out),
                                 "-j", "1"])
    assert result.exit_code == ExitCode.CASES_SKIPPED, result.output
    report = _report(out)
    reasons = {c["case_id"]: c["reason"] for c in report["cases"] if c["status"] == "skipped"}
    assert reasons == cohort["expected"]
    ok = {c["case_id"] for c in report["cases"] if c["status"] == "ok"}
    assert {"good0", "good1", "good2"} <= ok
    # the console table names each skipped case and its reason
    for case_id, reason in cohort["expected"].items():
        assert case_id in result.output and reason in result.output


def test_extract_skips_bad_cases_extracts_the_rest_and_resumes_from_cache(cohort):
    out = cohort["root"] / "extract"
    args = ["site", "extract", "-p", str(cohort["root"] / "study.toml"),
            "-m", str(cohort["root"] / "manifest.csv"), "-o", str(out), "-j", "2",
            "--site-name", "hospitalA"]
    result = runner.invoke(app, args)
    assert result.exit_code == ExitCode.CASES_SKIPPED, result.output
    report = _report(out)
    reasons = {c["case_id"]: c["reason"] for c in report["cases"] if c["status"] == "skipped"}
    assert reasons == cohort["expected"]
    table = pd.read_parquet(out / "features.parquet")
    expected_ok = {"good0", "good1", "good2"} | ({"dicom_good"} if cohort["has_dicom"] else set())
    assert set(table["case_id"]) == expected_ok
    assert list(table.columns[:5]) == ["case_id", "batch", "mask_source", "mrd", "age"]
    assert set(table["mask_source"]) == {"manual"}
    assert (table["batch"] == "scannerA").all()
    features = [c for c in table.columns if c.startswith("original_")]
    assert any("glcm" in c for c in features) and any("shape" in c for c in features)
    assert np.isfinite(table[features].to_numpy()).all()
    meta = read_features_metadata(out / "features.parquet")
    assert meta["protocol_hash"] == load_protocol(cohort["root"] / "study.toml").content_hash()
    assert meta["site"] == "hospitalA" and "pyradiomics-bhklab" in meta["software"]
    assert meta["standardization_steps"] == [{"step": "resegment", "range": [-1000.0, 1000.0],
                                              "outlier_sigma": None}]
    assert meta["pyradiomics_settings"]["binWidth"] == 10.0
    assert report["protocol_hash"] == meta["protocol_hash"]

    # A second run computes nothing: every good case comes from the cache, same numbers.
    again = runner.invoke(app, args)
    assert again.exit_code == ExitCode.CASES_SKIPPED
    cached = {c["case_id"]: c["cached"] for c in _report(out)["cases"] if c["status"] == "ok"}
    assert all(cached.values()) and set(cached) == expected_ok
    pd.testing.assert_frame_equal(pd.read_parquet(out / "features.parquet"), table)


def test_a_killed_run_resumes_where_it_stopped(cohort, tmp_path):
    """Only the cases without a cache entry are computed again."""
    out = tmp_path / "resume"
    args = ["site", "extract", "-p", str(cohort["root"] / "study.toml"),
            "-m", str(cohort["root"] / "manifest.csv"), "-o", str(out), "-j", "1"]
    assert runner.invoke(app, args).exit_code == ExitCode.CASES_SKIPPED
    entries = sorted((out / "cache").rglob("*.json"))
    assert len(entries) >= 3
    entries[0].unlink()  # as if the run had been killed before this case finished
    (entries[1].parent / ".leftover.json.tmp").write_text("{half a fi")  # an interrupted write
    entries[1].write_text("{damaged")
    assert runner.invoke(app, args).exit_code == ExitCode.CASES_SKIPPED
    cached = [c["cached"] for c in _report(out)["cases"] if c["status"] == "ok"]
    assert cached.count(False) == 2 and cached.count(True) == len(cached) - 2


def test_protocol_with_a_wrong_field_is_refused_before_any_case(cohort, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(PROTOCOL_TOML.replace("bin_width = 10.0", "bin_widht = 10.0"))
    result = runner.invoke(app, ["site", "extract", "-p", str(bad), "-m",
                                 str(cohort["root"] / "manifest.csv"), "-o", str(tmp_path / "o")])
    assert result.exit_code == ExitCode.CONFIG
    assert "radiomics.bin_widht: Extra inputs are not permitted" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("command", "content", "needle"), [
    ("protocol", "name: " + "[" * 20_000 + "]" * 20_000, "nested deeper than 32 levels"),
    ("protocol", PROTOCOL_TOML.replace("glcm = []", "glcm = [\"NoSuchFeature\"]"),
     "feature_classes.glcm: no feature ['NoSuchFeature'] in pyradiomics"),
    ("protocol", PROTOCOL_TOML.replace("bin_width = 10.0", "bin_width = inf"),
     "radiomics.bin_width: Input should be a finite number"),
    ("manifest", "case_id;image;mask;mrd;age\na;x;y;1;50\n",
     "the header is one column holding ';': a manifest is comma-separated"),
    ("manifest", "case_id,image,mask,mrd,age,age\na,x,y,1,50,50\n",
     "column 'age' appears more than once in the header"),
])
def test_a_bad_protocol_or_manifest_exits_2_naming_the_reason(tmp_path, command, content,
                                                            needle):
    """Before issue 20 these exited 1 with a traceback (RecursionError), or passed validation
    and failed every case."""
    protocol, manifest = tmp_path / "study.toml", tmp_path / "m.csv"
    protocol.write_text(PROTOCOL_TOML)
    manifest.write_text("case_id,image,mask,mrd,age\na,x.nii,y.nii,1,50\n")
    if command == "protocol":
        protocol = tmp_path / ("deep.yaml" if content.startswith("name:") else "bad.toml")
        protocol.write_text(content)
    else:
        manifest.write_text(content)
    for args in (["protocol", "validate", str(protocol)],
                 ["site", "check", "-p", str(protocol), "-m", str(manifest), "-o",
                  str(tmp_path / "o")]):
        if command == "manifest" and args[0] == "protocol":
            continue
        result = runner.invoke(app, args)
        assert result.exit_code == ExitCode.CONFIG, result.output
        assert needle in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output


def test_all_cases_bad_exits_4(tmp_path):
    (tmp_path / "study.toml").write_text(PROTOCOL_TOML)
    (tmp_path / "m.csv").write_text("case_id,image,mask,mrd,age\na,nope.nii,nope.nii,1,50\n")
    result = runner.invoke(app, ["site", "check", "-p", str(tmp_path / "study.toml"),
                                 "-m", str(tmp_path / "m.csv"), "-o", str(tmp_path / "o")])
    assert result.exit_code == ExitCode.NO_USABLE_CASE


def test_sigkill_mid_run_then_rerun_keeps_every_finished_case(tmp_path):
    """A real interruption: kill the extracting process, run again, and only the unfinished
    cases are computed; no half-written cache entry is ever read."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rows = ["case_id,image,mask,mrd,age"]
    for i in range(8):
        img, msk = make_volume(shape_zyx=(24, 64, 64), seed=i)
        rows.append(f"c{i},{_save(img, tmp_path / f'c{i}.nii.gz')},"
                    f"{_save(msk, tmp_path / f'm{i}.nii.gz')},{i % 2},50")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "study.toml").write_text(PROTOCOL_TOML.replace(
        "[radiomics]", '[radiomics]\nimage_types = { original = true, log_sigma_mm = [1.0, 2.0] }'))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cli.main", "site", "extract", "-p",
           str(tmp_path / "study.toml"), "-m", str(tmp_path / "m.csv"), "-o", str(out), "-j", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "cache").rglob("*.json"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "cache").rglob("*.json")))
    assert 2 <= finished < 8
    assert not (out / "features.parquet").exists()

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == ExitCode.OK, rerun.stderr[-2000:]
    cases = _report(out)["cases"]
    assert [c["cached"] for c in cases].count(True) == finished
    assert len(pd.read_parquet(out / "features.parquet")) == 8


def test_site_config_supplies_manifest_name_and_work_dir(cohort, tmp_path):
    config = tmp_path / "site.toml"
    config.write_text(f'site_name = "hospital_B"\nmanifest = "{cohort["root"] / "manifest.csv"}"\n'
                      'work_dir = "work"\nworkers = 1\n')
    result = runner.invoke(app, ["site", "check", "-p", str(cohort["root"] / "study.toml"),
                                 "--site-config", str(config)])
    assert result.exit_code == ExitCode.CASES_SKIPPED, result.output
    report = json.loads((tmp_path / "work" / "ingestion_report.json").read_text())
    assert report["site"] == "hospital_B" and report["mode"] == "check"
    bad = tmp_path / "bad.toml"
    bad.write_text('site_name = "x y"\nmanifest = "m.csv"\n')
    result = runner.invoke(app, ["site", "check", "-p", str(cohort["root"] / "study.toml"),
                                 "--site-config", str(bad)])
    assert result.exit_code == ExitCode.CONFIG and "site_name" in result.output


def test_checking_two_sites_from_one_folder_keeps_both_reports(cohort, tmp_path, monkeypatch):
    """Without --out or a site config, each manifest's report goes to
    ./myelofed-work/<its folder's name> (or <--site-name>): the second site's check used to
    overwrite the first one's."""
    monkeypatch.chdir(tmp_path)
    for site in ("site_A", "site_B"):
        (tmp_path / site).mkdir()
        shutil.copy(cohort["root"] / "manifest.csv", tmp_path / site / "manifest.csv")
        result = runner.invoke(app, ["site", "check", "-p", str(cohort["root"] / "study.toml"),
                                     "-m", str(tmp_path / site / "manifest.csv"), "-j", "1"])
        assert result.exit_code == ExitCode.CASES_SKIPPED, result.output
    for site in ("site_A", "site_B"):
        assert (tmp_path / "myelofed-work" / site / "ingestion_report.json").is_file()
