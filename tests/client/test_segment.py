"""Segmentation at a site: the network's mask-free input, its training and sliding-window
masks on each case's own grid, the quality control of a mask it made, the agreement with a
hand-drawn one (MONAI's Dice and HD95), a DICOM SEG that reads back to the same mask, and the
two commands a site runs (``myelofed site train-segmenter`` and ``segment``).

One small synthetic site (8 patients, NIfTI and DICOM + SEG) is written once for the module.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from typer.testing import CliRunner

from cli.main import app
from client.dicom.masks import seg_to_mask
from client.dicom.seg_out import ALGORITHM_NAME, write_seg
from client.loading import load_case, read_image
from client.manifest import CaseSpec, read_manifest
from client.segment.inputs import network_classes, network_input, network_spacing
from client.segment.quality import agreement, quality_problems
from client.segment.site import header_of, load_training, segment_case, train_alone
from common.errors import CaseError, SkipReason
from common.protocol import Modality, SegmentationSpec, StudyProtocol, load_protocol
from common.segmenter import SegmenterLabels
from common.synthetic import CohortSpec, make_sites, write_cohort

SPEC = SegmentationSpec(channels=(4, 8, 16), patch_size=(32, 32, 8), rounds=1,
                        patches_per_case=2, batch_size=4)
CPU = torch.device("cpu")
BUDGET = 50_000_000


@dataclass(frozen=True)
class Site:
    root: Path
    protocol: StudyProtocol
    cases: list[CaseSpec]
    dicom: list[CaseSpec]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("segment")
    write_cohort(root / "cohort", CohortSpec(make_sites((8,)), file_format="both"), workers=2)
    protocol = load_protocol(root / "cohort" / "study.yaml").model_copy(
        update={"segmentation": SPEC})
    protocol = StudyProtocol.model_validate(protocol.model_dump())
    (root / "seg.yaml").write_text(yaml.safe_dump(protocol.model_dump(mode="json")))
    folder = root / "cohort" / "site_A"
    cases, problems = read_manifest(folder / "manifest.csv", protocol, "site_A")
    dicom, _ = read_manifest(folder / "manifest_dicom.csv", protocol, "site_A")
    assert not problems and len(cases) == 8
    return Site(root, protocol, cases, dicom)


def test_the_input_needs_no_mask_and_sits_on_the_networks_grid(site: Site):
    image = read_image(site.cases[0], site.protocol)
    item = network_input(image, network_spacing(site.protocol), Modality.MR, BUDGET)
    assert item.grid.GetSpacing() == pytest.approx(network_spacing(site.protocol)[::-1])
    assert item.values.shape == sitk.GetArrayViewFromImage(item.grid).shape
    assert item.values.dtype == np.float32
    # the image's own percentiles scale it: a scanner's gain drops out
    brighter = network_input(image * 3.0, network_spacing(site.protocol), Modality.MR, BUDGET)
    np.testing.assert_allclose(brighter.values, item.values, atol=1e-5)
    # CT: a fixed window, -1000 HU to 0 and 2000 HU to 1
    ct = network_input(sitk.Cast(image * 0.0 + 500.0, sitk.sitkFloat32), (4.0, 1.0, 1.0),
                       Modality.CT, BUDGET)
    np.testing.assert_allclose(ct.values, 0.5)
    with pytest.raises(CaseError) as refused:
        network_input(image, (4.0, 0.1, 0.1), Modality.MR, 100_000)
    assert refused.value.reason is SkipReason.RESOURCE_LIMIT


def test_label_values_become_the_networks_classes(site: Site):
    volume = load_case(site.cases[0], site.protocol)
    labels = SegmenterLabels.of(site.protocol)
    item = network_input(volume.image, network_spacing(site.protocol), Modality.MR, BUDGET)
    classes = network_classes(volume.labels, item.grid, labels)
    assert set(np.unique(classes)) == {0, 1, 2}
    drawn = sitk.GetArrayViewFromImage(volume.labels)
    share = [(drawn == v).mean() for v in labels.values]
    made = [(classes == i).mean() for i in (1, 2)]
    np.testing.assert_allclose(made, share, rtol=0.15)


def test_quality_control_passes_a_drawn_mask_and_names_what_is_wrong(site: Site):
    loaded = load_training(site.cases, site.protocol, BUDGET)
    header = header_of(site.protocol, list(loaded.shapes.values()), {})
    labels, spec = header.labels, header.segmentation
    mask = load_case(site.cases[0], site.protocol).labels
    assert quality_problems(mask, labels, spec, header.volume_ml, header.parts) == []

    values = sitk.GetArrayFromImage(mask)
    empty = values.copy()
    empty[empty == 2] = 0
    problems = quality_problems(_like(empty, mask), labels, spec, header.volume_ml, header.parts)
    assert problems == ["label 2 (Paraspinal muscle) is empty"]

    specks = values.copy()
    rng = np.random.default_rng(0)
    background = np.argwhere(values == 0)
    chosen = background[rng.choice(len(background), int((values == 1).sum() * 0.3))]
    specks[tuple(chosen.T)] = 1
    problems = quality_problems(_like(specks, mask), labels, spec, header.volume_ml,
                                header.parts)
    assert any("label 1 (Vertebral marrow) is fragmented" in p for p in problems), problems

    low, high = header.volume_ml["1"]
    narrow = {**header.volume_ml, "1": (high * 3, high * 4)}
    problems = quality_problems(mask, labels, spec, narrow, header.parts)
    assert len(problems) == 1 and "outside the training masks'" in problems[0]


def _like(values: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(values.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def test_agreement_is_monais_dice_and_hd95(site: Site):
    labels = SegmenterLabels.of(site.protocol)
    truth = load_case(site.cases[1], site.protocol).labels
    assert agreement(truth, truth, labels) == {1: (1.0, 0.0), 2: (1.0, 0.0)}
    values = sitk.GetArrayFromImage(truth)
    shifted = np.roll(values, 3, axis=2)  # three voxels along x
    measured = agreement(_like(shifted, truth), truth, labels)
    for value in labels.values:
        a, b = shifted == value, values == value
        assert measured[value][0] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()),
                                                   rel=1e-6)
        assert 0 < measured[value][1] <= 3 * truth.GetSpacing()[0] + 1e-6


def test_a_trained_network_masks_a_case_on_its_own_grid(site: Site):
    loaded = load_training(site.cases[:6], site.protocol, BUDGET)
    assert len(loaded.cases) == 6 and not loaded.skipped
    training = list(loaded.cases.values())
    network, result = train_alone(site.protocol, training, seed=0, site_name="A", device=CPU,
                                  epochs=2)
    assert result.patches == 2 * 6 * SPEC.patches_per_case and np.isfinite(result.loss)
    again, _ = train_alone(site.protocol, training, seed=0, site_name="A", device=CPU, epochs=2)
    first, second = network.state_dict(), again.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)  # seeded on the CPU
    header = header_of(site.protocol, list(loaded.shapes.values()), {"cases": 6})
    case = site.cases[7]
    segmented = segment_case(case, site.protocol, header, network.eval(), BUDGET, CPU,
                             compare=True)
    image = read_image(case, site.protocol)
    assert segmented.mask is not None
    assert segmented.mask.GetSize() == image.GetSize()
    assert segmented.mask.GetSpacing() == image.GetSpacing()
    assert set(segmented.agreement) == {1, 2}
    assert all(0 <= dice <= 1 for dice, _ in segmented.agreement.values())


def test_a_case_that_cannot_be_read_comes_back_named(site: Site):
    network, _ = train_alone(site.protocol, list(load_training(
        site.cases[:2], site.protocol, BUDGET).cases.values()), seed=0, site_name="A",
        device=CPU, epochs=1)
    loaded = load_training(site.cases[:2], site.protocol, BUDGET)
    header = header_of(site.protocol, list(loaded.shapes.values()), {})
    broken = CaseSpec("gone", 2, site.root / "absent.nii.gz", None, float("nan"), "A")
    result = segment_case(broken, site.protocol, header, network, BUDGET, CPU)
    assert result.mask is None and result.problems[0].startswith("file_missing")


def test_a_dicom_seg_written_for_a_series_reads_back_to_the_same_mask(site: Site,
                                                                      tmp_path: Path):
    case = site.dicom[0]
    image = read_image(case, site.protocol)
    truth = load_case(case, site.protocol).labels
    labels = SegmenterLabels.of(site.protocol)
    segments = list(zip(labels.values, labels.names, strict=True))
    write_seg(truth, case.image, None, segments, tmp_path / "auto.seg.dcm", "1.0")
    drawn = sitk.GetArrayViewFromImage(truth)
    for value, name in segments:
        back = sitk.GetArrayFromImage(seg_to_mask(tmp_path / "auto.seg.dcm", image, name))
        np.testing.assert_array_equal(back, drawn == value)
    import pydicom

    seg = pydicom.dcmread(tmp_path / "auto.seg.dcm")
    item = seg.SegmentSequence[0]
    assert item.SegmentAlgorithmType == "AUTOMATIC"
    assert item.SegmentAlgorithmName == ALGORITHM_NAME
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(
        next(p for p in sorted(case.image.iterdir()))).SeriesInstanceUID


def test_a_row_without_a_mask_is_a_case_to_segment_and_elsewhere_a_named_skip(site: Site,
                                                                              tmp_path: Path):
    manifest = _without_masks(site, tmp_path, every=3)
    cases, problems = read_manifest(manifest, site.protocol, "site_A", for_segmentation=True)
    assert not problems and [c.case_id for c in cases if c.mask is None] == [
        "site_A_000", "site_A_003", "site_A_006"]
    cases, problems = read_manifest(manifest, site.protocol, "site_A")
    assert len(cases) == 5 and {p.case_id for p in problems} == {
        "site_A_000", "site_A_003", "site_A_006"}
    assert all(p.reason is SkipReason.MISSING_FIELD and "myelofed site segment" in p.detail
               for p in problems)


def test_a_study_reads_a_row_without_a_mask_by_what_its_network_made(site: Site,
                                                                     tmp_path: Path):
    manifest = _without_masks(site, tmp_path, every=3)  # site_A_000, _003, _006 have none
    pending, problems = read_manifest(manifest, site.protocol, "A", auto_masks="pending")
    assert not problems and len(pending) == 8  # before the network ran: counted as cases
    assert [c.case_id for c in pending if c.mask is None] == [
        "site_A_000", "site_A_003", "site_A_006"]
    made = tmp_path / "made.nii.gz"
    cases, problems = read_manifest(manifest, site.protocol, "A", data_root=site.root / "cohort",
                                    auto_masks={"site_A_000": made,
                                                "site_A_003": "label 1 (ROI) is empty"})
    by_id = {c.case_id: c for c in cases}
    # the mask made is used, and marked, though it lies outside the data root
    assert by_id["site_A_000"].mask == made and by_id["site_A_000"].auto_mask
    assert not by_id["site_A_001"].auto_mask
    reasons = {p.case_id: p.detail for p in problems}
    assert reasons["site_A_003"] == ("no mask, and the study's segmentation network made no "
                                     "usable one: label 1 (ROI) is empty")
    assert "myelofed site segment" in reasons["site_A_006"]  # never segmented


def test_the_segmented_manifest_names_the_masks_made_and_keeps_every_other_field(
        site: Site, tmp_path: Path):
    from cli.segment import _write_manifest

    manifest = _without_masks(site, tmp_path, every=4)
    _write_manifest(manifest, tmp_path / "out" / "manifest.csv", {"site_A_000": "/m/0.nii.gz"})
    before = list(csv.DictReader(manifest.open()))
    after = list(csv.DictReader((tmp_path / "out" / "manifest.csv").open()))
    assert [r["case_id"] for r in after] == [r["case_id"] for r in before]
    assert (after[0]["mask"], after[0]["mask_source"]) == ("/m/0.nii.gz", "auto")
    assert (after[4]["mask"], after[4]["mask_source"]) == ("", "")  # not made: still none
    assert after[1]["mask_source"] == "manual"
    assert Path(after[1]["mask"]) == (manifest.parent / before[1]["mask"]).resolve()
    assert all(a[k] == b[k] for a, b in zip(after, before, strict=True)
               for k in b if k not in ("image", "mask"))
    # the manifest it wrote reads as a study's: the masks made are cases like the others
    cases, problems = read_manifest(tmp_path / "out" / "manifest.csv", site.protocol, "A")
    assert len(cases) == 7 and [p.case_id for p in problems] == ["site_A_004"]


def _without_masks(site: Site, tmp_path: Path, every: int) -> Path:
    """The site's manifest with every ``every``-th mask left empty or 'auto', beside it."""
    source = site.root / "cohort" / "site_A" / "manifest.csv"
    rows = list(csv.DictReader(source.open(encoding="utf-8")))
    for i, row in enumerate(rows):
        if i % every == 0:
            row["mask"] = "auto" if i % (2 * every) == 0 else ""
    target = source.parent / f"auto_{tmp_path.name}.csv"
    with target.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return target


def test_the_site_commands_train_a_model_and_segment_the_cases_without_a_mask(
        site: Site, tmp_path: Path):
    protocol = str(site.root / "seg.yaml")
    trained = CliRunner().invoke(app, [
        "site", "train-segmenter", "-p", protocol, "-m",
        str(site.root / "cohort" / "site_A" / "manifest.csv"), "-o", str(tmp_path / "model"),
        "--epochs", "2", "--test-fraction", "0.25", "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    check = json.loads((tmp_path / "model" / "segmentation_check.json").read_text())
    assert check["trained_on"] == 6 and check["summary"]["cases"] == 2
    manifest = _without_masks(site, tmp_path, every=4)
    result = CliRunner().invoke(app, [
        "site", "segment", "-p", protocol, "-m", str(manifest), "--model",
        str(tmp_path / "model" / "segmenter.npz"), "-o", str(tmp_path / "seg"),
        "--device", "cpu"])
    report = json.loads((tmp_path / "seg" / "segmentation_report.json").read_text())
    assert [r["case_id"] for r in report["cases"]] == ["site_A_000", "site_A_004"]
    # two epochs make no usable mask: each is refused by name, its row keeps no mask
    rows = {r["case_id"]: r for r in csv.DictReader((tmp_path / "seg" / "manifest.csv").open())}
    assert all(r["problems"] and not r["used"] for r in report["cases"]), report
    assert rows["site_A_000"]["mask"] == "auto" and rows["site_A_004"]["mask"] == ""
    assert rows["site_A_001"]["mask_source"] == "manual"
    assert result.exit_code == 4 and "2 refused (site_A_000, site_A_004)" in result.output

    bad = CliRunner().invoke(app, [
        "site", "segment", "-p", "preset:wb_ldct", "-m", str(manifest), "--model",
        str(tmp_path / "model" / "segmenter.npz"), "-o", str(tmp_path / "ct")])
    assert bad.exit_code == 2 and "trained on MR images" in bad.output
