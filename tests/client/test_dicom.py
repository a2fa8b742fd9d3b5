"""DICOM readers on the real sarcoma CT/MR/PET series with RTSTRUCT, and on made-up headers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from client import dicom
from common.errors import CaseError, SkipReason
from tests.conftest import shared_data

PATIENTS = ("STS_002", "STS_008", "STS_012", "STS_019")
MODALITIES = ("CT", "MR_T1", "PET")


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("patient", PATIENTS)
def test_rtstruct_mask_matches_the_nifti_mask(patient, modality):
    series = shared_data("sts", "dicom", patient, modality)
    reference = sitk.ReadImage(str(shared_data("sts", "nifti", patient, f"{modality}_mask.nii.gz")))

    image, header = dicom.read_dicom_series(series / "image")
    mask = dicom.rtstruct_to_mask(series / "mask" / "RS.dcm", image, f"GTV_Mass_{modality}")

    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    ours = sitk.GetArrayFromImage(mask).astype(bool)
    theirs = sitk.GetArrayFromImage(reference).astype(bool)
    assert abs(int(ours.sum()) - int(theirs.sum())) <= 0.01 * theirs.sum()
    assert (ours == theirs).mean() > 0.999  # voxel by voxel, not only the count


@pytest.mark.parametrize("modality", MODALITIES)
def test_dicom_image_equals_the_nifti_image(modality):
    series = shared_data("sts", "dicom", "STS_002", modality, "image")
    nifti = shared_data("sts", "nifti", "STS_002", f"{modality}_image.nii.gz")
    image, header = dicom.read_dicom_series(series)
    factor = dicom.suv_factor_body_weight(header) if modality == "PET" else 1.0
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti)))
    # The published PET is stored in g/mL (Units GML), i.e. SUV already: the factor is 1.
    np.testing.assert_allclose(sitk.GetArrayFromImage(image) * factor, expected,
                               rtol=1e-5, atol=1e-5)


def _pet_header(**changes) -> Dataset:
    ds = Dataset()
    ds.Units = "BQML"
    ds.DecayCorrection = "START"
    ds.PatientWeight = "80"
    ds.SeriesTime = "110000.00"
    info = Dataset()
    info.RadionuclideTotalDose = "370000000"  # 370 MBq
    info.RadionuclideHalfLife = "6586.2"      # F-18
    info.RadiopharmaceuticalStartTime = "100000"
    ds.RadiopharmaceuticalInformationSequence = [info]
    for key, value in changes.items():
        if key in ("RadionuclideTotalDose", "RadiopharmaceuticalStartTime"):
            setattr(info, key, value)
        elif value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def test_suv_body_weight_decays_the_dose_to_the_scan_start():
    # One hour after injection: dose * 2^(-3600 / 6586.2); SUV factor = 80000 g / that dose.
    expected = 80_000 / (370e6 * 2 ** (-3600 / 6586.2))
    assert dicom.suv_factor_body_weight(_pet_header()) == pytest.approx(expected, rel=1e-9)
    assert dicom.suv_factor_body_weight(_pet_header(DecayCorrection="ADMIN")) == pytest.approx(
        80_000 / 370e6)
    assert dicom.suv_factor_body_weight(_pet_header(Units="GML")) == 1.0


def test_suv_handles_an_injection_before_midnight():
    header = _pet_header(SeriesTime="003000", RadiopharmaceuticalStartTime="233000")
    expected = 80_000 / (370e6 * 2 ** (-3600 / 6586.2))
    assert dicom.suv_factor_body_weight(header) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("missing", ["PatientWeight", "RadionuclideTotalDose"])
def test_suv_names_the_missing_tag(missing):
    header = _pet_header(**{missing: None} if missing == "PatientWeight"
                         else {missing: ""})
    with pytest.raises(CaseError) as err:
        dicom.suv_factor_body_weight(header)
    assert err.value.reason is SkipReason.SUV_TAGS_MISSING and missing in err.value.detail


def test_truncated_slice_is_refused_naming_the_file(tmp_path: Path):
    source = shared_data("sts", "dicom", "STS_008", "MR_T1", "image")
    folder = tmp_path / "series"
    shutil.copytree(source, folder)
    victim = sorted(folder.iterdir())[5]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 5000])  # header intact, pixel data cut short
    with pytest.raises(CaseError) as err:
        dicom.read_dicom_series(folder)
    assert err.value.reason is SkipReason.IMAGE_UNREADABLE and victim.name in err.value.detail
    victim.write_bytes(data[:200])  # header cut
    with pytest.raises(CaseError) as err:
        dicom.read_dicom_series(folder)
    assert err.value.reason is SkipReason.IMAGE_UNREADABLE and victim.name in err.value.detail


def test_missing_slice_is_refused(tmp_path: Path):
    folder = tmp_path / "series"
    shutil.copytree(shared_data("sts", "dicom", "STS_008", "MR_T1", "image"), folder)
    image, _ = dicom.read_dicom_series(folder)
    slices = sorted(folder.iterdir(), key=lambda p: float(
        pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    slices[len(slices) // 2].unlink()
    with pytest.raises(CaseError, match="uneven slice spacing"):
        dicom.read_dicom_series(folder)


def test_two_series_in_one_folder_need_a_series_uid(tmp_path: Path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for modality in ("CT", "PET"):
        for f in shared_data("sts", "dicom", "STS_019", modality, "image").iterdir():
            shutil.copy(f, folder / f"{modality}_{f.name}")
    shutil.copy(shared_data("sts", "dicom", "STS_019", "CT", "mask", "RS.dcm"), folder / "RS.dcm")
    series = dicom.list_series(folder)
    assert len(series) == 2  # the RTSTRUCT is not a series
    with pytest.raises(CaseError) as err:
        dicom.read_dicom_series(folder)
    assert err.value.reason is SkipReason.SERIES_NOT_FOUND and "series_uid" in err.value.detail
    sizes = {dicom.read_dicom_series(folder, uid)[0].GetSize() for uid in series}
    assert len(sizes) == 2
    with pytest.raises(CaseError) as err:
        dicom.read_dicom_series(folder, "1.2.3")
    assert err.value.reason is SkipReason.SERIES_NOT_FOUND


def test_wrong_roi_name_lists_the_available_ones():
    series = shared_data("sts", "dicom", "STS_002", "CT")
    image, _ = dicom.read_dicom_series(series / "image")
    with pytest.raises(CaseError) as err:
        dicom.rtstruct_to_mask(series / "mask" / "RS.dcm", image, "GTV_Mass")
    assert err.value.reason is SkipReason.ROI_NOT_FOUND and "GTV_Mass_CT" in err.value.detail
    lower = dicom.rtstruct_to_mask(series / "mask" / "RS.dcm", image, "gtv_mass_ct")
    assert sitk.GetArrayFromImage(lower).sum() > 0


def test_non_rtstruct_mask_is_unreadable(tmp_path: Path):
    image = sitk.Image([4, 4, 4], sitk.sitkFloat32)
    junk = tmp_path / "RS.dcm"
    junk.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    with pytest.raises(CaseError) as err:
        dicom.rtstruct_to_mask(junk, image, "x")
    assert err.value.reason is SkipReason.MASK_UNREADABLE
    ct_slice = next(shared_data("sts", "dicom", "STS_002", "CT", "image").iterdir())
    with pytest.raises(CaseError, match="not RTSTRUCT"):
        dicom.rtstruct_to_mask(ct_slice, image, "x")


@pytest.mark.filterwarnings("ignore::UserWarning")  # highdicom on the source's patient name
def test_seg_round_trip_equals_the_rtstruct_mask(tmp_path: Path):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    series = shared_data("sts", "dicom", "STS_019", "PET")
    image, _ = dicom.read_dicom_series(series / "image")
    mask = sitk.GetArrayFromImage(
        dicom.rtstruct_to_mask(series / "mask" / "RS.dcm", image, "GTV_Mass_PET")).astype(bool)
    sources = sorted((pydicom.dcmread(p) for p in (series / "image").iterdir()),
                     key=lambda ds: float(ds.ImagePositionPatient[2]))
    # frames in the order of the source images (ascending z, as the SimpleITK array)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="GTV_Mass_PET",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=99,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="MyeloFed",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0",
    )
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    assert dicom.dicom_modality(path) == "SEG"
    back = sitk.GetArrayFromImage(dicom.seg_to_mask(path, image, "gtv_mass_pet")).astype(bool)
    np.testing.assert_array_equal(back, mask)
    with pytest.raises(CaseError) as err:
        dicom.seg_to_mask(path, image, "Liver")
    assert err.value.reason is SkipReason.ROI_NOT_FOUND and "GTV_Mass_PET" in err.value.detail
