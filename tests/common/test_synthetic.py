from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from cli.exit_codes import ExitCode
from cli.main import app
from client.loading import load_case
from client.manifest import read_manifest
from common.errors import CaseError, SkipReason
from common.protocol import load_protocol, protocol_from_mapping
from common.synthetic import (
    MUSCLE_LABEL,
    ROI_LABEL,
    CohortSpec,
    Pattern,
    Task,
    make_cohort,
    make_patients,
    make_sites,
    render,
    write_cohort,
)

runner = CliRunner()


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def test_same_seed_same_cohort_other_seed_other_cohort():
    sites = make_sites((6, 5))
    a, b = make_cohort(sites, seed=3), make_cohort(sites, seed=3)
    assert a == b
    assert make_cohort(sites, seed=4) != a
    scanner = sites[0].scanners[0]
    img_a, lab_a, les_a = render(a[0], scanner, "MR", seed=3)
    img_b, lab_b, les_b = render(b[0], scanner, "MR", seed=3)
    for x, y in ((img_a, img_b), (lab_a, lab_b), (les_a, les_b)):
        np.testing.assert_array_equal(_array(x), _array(y))
    other, _, _ = render(a[0], scanner, "MR", seed=4)
    assert not np.array_equal(_array(other), _array(img_a))


def test_a_sites_patients_do_not_depend_on_the_other_sites():
    two, three = make_sites((5, 6)), make_sites((5, 6, 7))
    assert make_patients(two[1], seed=0) == make_patients(three[1], seed=0)


def test_sites_are_non_iid_and_scanners_differ():
    sites = make_sites((40, 70, 110, 30))
    assert [s.n_patients for s in sites] == [40, 70, 110, 30]
    assert len({s.mm_fraction for s in sites}) == 4
    assert len({sc.spacing_mm for s in sites for sc in s.scanners}) >= 4
    assert len(sites[2].scanners) == 2  # hospitals with two scanners
    cohort = make_cohort(sites[2:3])
    assert {p.scanner for p in cohort} == {sc.name for sc in sites[2].scanners}
    second = sites[2].scanners[1].name  # referral: myeloma more often on the second scanner
    assert np.mean([p.scanner == second for p in cohort if p.diagnosis == "myeloma"]) > np.mean(
        [p.scanner == second for p in cohort if p.diagnosis == "metastasis"])
    flat = make_sites((5, 5, 5, 5), scanner_effects=False)
    assert len({sc for s in flat for sc in s.scanners}) == 1
    prevalence = [np.mean([p.diagnosis == "myeloma" for p in make_patients(s)])
                  for s in make_sites((300, 300, 300))]
    assert prevalence[0] < prevalence[1] < prevalence[2]  # 0.35 / 0.50 / 0.65 by default


def test_labels_follow_the_literature_directions():
    patients = make_cohort(make_sites((200, 200)), seed=0)
    mm = [p for p in patients if p.diagnosis == "myeloma"]
    met = [p for p in patients if p.diagnosis == "metastasis"]
    assert all(p.iss_stage is None and p.mrd is None and p.response is None for p in met)
    assert np.mean([p.pci for p in mm]) > 3 * np.mean([p.pci for p in met])
    stage3 = [p.pci for p in mm if p.iss_stage == "III"]
    stage1 = [p.pci for p in mm if p.iss_stage == "I"]
    assert np.mean(stage3) > np.mean(stage1)  # ISS stage tracks tumour burden
    responders = [p.pci for p in mm if p.response == 1]
    non_responders = [p.pci for p in mm if p.response == 0]
    assert np.mean(responders) < np.mean(non_responders)
    assert np.mean([p.mrd for p in mm if p.response == 1]) < np.mean(
        [p.mrd for p in mm if p.response == 0])
    assert {p.pattern for p in mm} == set(Pattern) - {Pattern.METASTASIS}
    assert all(p.lesions for p in met) and all(
        p.lesions for p in mm if p.pattern in (Pattern.FOCAL, Pattern.MIXED))


def test_myeloma_only_tasks_and_after_treatment_scans():
    site = make_sites((80,))[0]
    for task in (Task.PCI, Task.RESPONSE, Task.MRD):
        patients = make_patients(site, task)
        assert all(p.diagnosis == "myeloma" and p.iss_stage in ("I", "II", "III")
                   for p in patients)
    assert {p.timepoint for p in make_patients(site, Task.MRD)} == {"after_treatment"}
    assert {p.timepoint for p in make_patients(site, Task.PCI)} == {"diagnosis"}


def test_render_anatomy_masks_and_diffuse_signal_loss():
    sites = make_sites((60,), scanner_effects=False)
    scanner = sites[0].scanners[0]
    patients = make_patients(sites[0], seed=1)
    normal = next(p for p in patients if p.pattern is Pattern.NORMAL)
    diffuse = next(p for p in patients if p.pattern is Pattern.DIFFUSE)
    means = {}
    for patient in (normal, diffuse):
        image, labels, _ = render(patient, scanner, "MR", seed=1)
        lab = _array(labels)
        assert (lab == ROI_LABEL).sum() > 5000 and (lab == MUSCLE_LABEL).sum() > 1000
        assert image.GetSpacing() == labels.GetSpacing() == scanner.spacing_mm
        assert image.GetOrigin() == labels.GetOrigin()
        means[patient.pattern] = _array(image)[lab == ROI_LABEL].mean()
        # LPS: the vertebral body lies anterior (lower y index) of the paraspinal muscles
        rows = np.nonzero(lab)[1]
        assert rows[lab[np.nonzero(lab)] == ROI_LABEL].mean() < rows[
            lab[np.nonzero(lab)] == MUSCLE_LABEL].mean()
    assert means[Pattern.DIFFUSE] < 0.85 * means[Pattern.NORMAL]  # T1 marrow signal loss
    ct, _, _ = render(normal, scanner, "CT", seed=1)
    assert -1200 <= _array(ct).min() and _array(ct).max() < 3000  # HU


def test_focal_lesions_are_dark_on_t1_and_lytic_on_ct():
    site = make_sites((60,), scanner_effects=False)[0]
    focal = next(p for p in make_patients(site, seed=2) if p.pattern is Pattern.FOCAL)
    for modality, darker in (("MR", 0.6), ("CT", 0.5)):
        image, labels, lesions = render(focal, site.scanners[0], modality, seed=2)
        img, lab, les = _array(image), _array(labels), _array(lesions).astype(bool)
        core = les & (lab == ROI_LABEL)
        assert core.sum() > 20
        assert img[core].mean() < darker * img[(lab == ROI_LABEL) & ~les].mean()


def test_mrd_positive_marrow_shows_residual_disease():
    site = make_sites((120,), scanner_effects=False)[0]
    patients = make_patients(site, Task.MRD, seed=0)
    signal: dict[int, list[float]] = {0: [], 1: []}
    for p in patients[:60]:
        image, labels, _ = render(p, site.scanners[0], "MR", seed=0)
        lab = _array(labels)
        signal[p.mrd].append(_array(image)[lab == ROI_LABEL].mean()
                             / np.median(_array(image)[lab == MUSCLE_LABEL]))
    assert signal[0] and signal[1]
    assert np.mean(signal[1]) < np.mean(signal[0])  # residual infiltration: lower T1 signal


def test_simulate_writes_manifests_and_a_study_that_pass_site_check(tmp_path: Path):
    out = tmp_path / "cohort"
    result = runner.invoke(app, ["simulate", "-o", str(out), "--patients", "3,4", "-j", "1"])
    assert result.exit_code == 0, result.output
    assert (out / "preview.png").stat().st_size > 1000
    cohort = json.loads((out / "cohort.json").read_text())
    assert cohort["task"] == "diagnosis" and [s["n_patients"] for s in cohort["sites"]] == [3, 4]
    rows = list(csv.DictReader((out / "site_B" / "manifest.csv").open()))
    assert len(rows) == 4 and {"diagnosis", "pci", "mrd", "response", "age", "sex",
                               "iss_stage", "scanner", "pfs_months", "pfs_event", "os_months",
                               "os_event"} <= set(rows[0])
    assert cohort["survival"]["models"]["pfs"]["mrd_positive"] == pytest.approx(1 / 0.33)
    for protocol in (str(out / "study.yaml"), "preset:spine_mri_t1w", "preset:spine_mri_pci"):
        check = runner.invoke(app, ["site", "check", "-p", protocol, "-m",
                                    str(out / "site_A" / "manifest.csv"), "-o",
                                    str(tmp_path / "check")])
        assert check.exit_code == ExitCode.OK, check.output


@pytest.mark.parametrize("args, option", [
    (["--patients", "3,x"], "--patients"),
    (["--patients", "0"], "--patients"),
    (["--sites", "2", "--patients", "3,4,5"], "--patients"),
    (["--task", "survival"], "--task"),
    (["--modality", "PET"], "--modality"),
    (["--format", "png"], "--format"),
])
def test_simulate_refuses_bad_options_naming_them(tmp_path: Path, args: list[str], option: str):
    result = runner.invoke(app, ["simulate", "-o", str(tmp_path), *args])
    assert result.exit_code == ExitCode.CONFIG and option in result.output
    assert not (tmp_path / "cohort.json").exists()


def test_sites_option_repeats_the_default_sizes(tmp_path: Path):
    result = runner.invoke(app, ["simulate", "-o", str(tmp_path), "--sites", "2",
                                 "--patients", "2", "--task", "response", "--modality", "CT"])
    assert result.exit_code == 0, result.output
    cohort = json.loads((tmp_path / "cohort.json").read_text())
    assert [s["n_patients"] for s in cohort["sites"]] == [2, 2] and cohort["modality"] == "CT"
    study = load_protocol(tmp_path / "study.yaml")
    assert study.task.label_column == "response" and "iss_stage" in study.covariates.columns
    check = runner.invoke(app, ["site", "check", "-p", str(tmp_path / "study.yaml"), "-m",
                                str(tmp_path / "site_B" / "manifest.csv"), "-o",
                                str(tmp_path / "check")])
    assert check.exit_code == ExitCode.OK, check.output


@pytest.mark.filterwarnings("ignore::UserWarning")  # highdicom on synthetic attributes
def test_dicom_series_and_seg_read_back_equal_to_the_nifti(tmp_path: Path):
    spec = CohortSpec(make_sites((2, 2)), Task.DIAGNOSIS, "MR", seed=5, file_format="both")
    manifests = write_cohort(tmp_path, spec, workers=1)
    protocol = load_protocol(tmp_path / "study.yaml")
    site_dir = manifests["site_B"].parent
    nifti, _ = read_manifest(site_dir / "manifest.csv", protocol, "site_B")
    dicom, _ = read_manifest(site_dir / "manifest_dicom.csv", protocol, "site_B")
    assert [c.case_id for c in nifti] == [c.case_id for c in dicom]
    for a, b in zip(nifti, dicom, strict=True):
        from_nifti, from_dicom = load_case(a, protocol), load_case(b, protocol)
        np.testing.assert_array_equal(_array(from_nifti.image), _array(from_dicom.image))
        # the SEG's marrow and muscle segments give the same label map as the NIfTI
        np.testing.assert_array_equal(_array(from_nifti.labels), _array(from_dicom.labels))
        np.testing.assert_allclose(from_nifti.image.GetSpacing(), from_dicom.image.GetSpacing(),
                                   rtol=1e-6)
        np.testing.assert_allclose(from_nifti.image.GetOrigin(), from_dicom.image.GetOrigin(),
                                   atol=1e-3)
    first = sorted((site_dir / "dicom" / dicom[0].case_id / "image").iterdir())[0]
    ds = pydicom.dcmread(first)
    assert ds.Modality == "MR" and ds.PatientID == dicom[0].case_id
    assert ds.InstitutionName == "site_B" and ds.ManufacturerModelName.startswith("B_")
    seg = pydicom.dcmread(site_dir / "dicom" / dicom[0].case_id / "seg.dcm")
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ds.SeriesInstanceUID
    # a reference tissue the SEG does not hold is a named, per-case reason
    data = protocol.model_dump(mode="json")
    data["standardization"]["normalization"]["reference_roi"] = "Gluteal muscle"
    wrong = protocol_from_mapping(data)
    with pytest.raises(CaseError) as err:
        load_case(dicom[0], wrong)
    assert err.value.reason is SkipReason.ROI_NOT_FOUND and "Gluteal muscle" in str(err.value)


def test_myeloma_patients_have_survival_drawn_from_the_stated_hazards():
    from common.cox import fit_cox, site_cox_terms
    from common.synthetic.cohort import FOLLOW_UP_MONTHS, SURVIVAL

    diagnosis = make_cohort(make_sites((30, 30)), Task.DIAGNOSIS)
    for p in diagnosis:  # myeloma only; metastatic patients have none
        has = p.pfs_months is not None and p.os_months is not None
        assert has == (p.diagnosis == "myeloma"), p.case_id
        if has:
            assert 0 <= p.pfs_months <= p.os_months <= FOLLOW_UP_MONTHS[1]  # progression first
            assert p.pfs_event in (0, 1) and p.os_event in (0, 1)
            assert p.pfs_event >= p.os_event or p.pfs_months < p.os_months
    # the survival draws use a stream of their own: every other field is as it was drawn
    assert [p.pci for p in make_patients(make_sites((30,))[0], Task.DIAGNOSIS)] == [
        p.pci for p in diagnosis[:30]]
    # many patients: the stratified Cox fit of the generating factors finds the hazard ratios
    strata = []
    for site in make_sites((700, 700, 700)):
        mm = make_patients(site, Task.RESPONSE)
        x = np.array([[p.iss_stage == "II", p.iss_stage == "III", (p.age - 65) / 10, p.mrd,
                       (p.pci - 30) / 10] for p in mm], dtype=float)
        strata.append((x, np.array([p.os_months for p in mm]),
                       np.array([p.os_event for p in mm], dtype=float)))
    m = SURVIVAL["os"]
    truth = np.log([m.iss_ii, m.iss_iii, m.age_per_decade, m.mrd_positive, m.pci_per_10])
    beta = fit_cox(strata)
    hessian = sum(site_cox_terms(x, t, e, beta).hessian for x, t, e in strata)
    se = np.sqrt(np.diag(np.linalg.inv(hessian)))
    assert np.all(np.abs(beta - truth) < 3 * se) and np.all(se < 0.12)
    assert np.all(np.sign(beta) == np.sign(truth))  # every factor raises the hazard

