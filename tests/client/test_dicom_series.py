"""client.dicom.series and client.dicom.files on the real sarcoma CT / T1 MR / PET series: the
DICOM images against the published NIfTI images, and broken inputs (cut or missing slices, two
series in one folder, no folder, no DICOM)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from client.dicom.files import dicom_modality, is_dicom_file
from client.dicom.series import list_series, read_dicom_series
from client.dicom.suv import suv_factor_body_weight
from common.errors import CaseError, SkipReason
from tests.client.dicom_fixtures import CASES, SARCOMA_WARNINGS, STS, same_grid, series, sts

pytestmark = SARCOMA_WARNINGS


# --------------------------------------------------------------------------------------------
# 1. DICOM series -> image against the published NIfTI image
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("patient", "modality"), CASES)
def test_dicom_image_matches_nifti_image(patient: str, modality: str) -> None:
    # Prepare
    nifti_path = STS / "nifti" / patient / f"{modality}_image.nii.gz"
    sts("nifti", patient)
    if not nifti_path.is_file():
        pytest.skip(f"{nifti_path} is not in the shared copy (files of 4 MiB or more were dropped)")
    expected = sitk.ReadImage(str(nifti_path))
    # Execute
    image, header = series(patient, modality)
    # Assert: geometry
    assert same_grid(image, expected)
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    target = sitk.GetArrayFromImage(expected).astype(np.float64)
    if modality == "PET":
        # The published PET was converted to SUV before publication, and its DICOM says so:
        # Units = GML (g/mL), so the SUV factor is 1 and the values already equal the NIfTI SUV.
        assert image.GetPixelID() == sitk.sitkFloat32
        assert str(header.Units) == "GML"
        factor = suv_factor_body_weight(header)
        assert factor == 1.0
        np.testing.assert_allclose(values * factor, target, rtol=1e-6, atol=1e-6)
    else:
        # CT in HU (RescaleSlope/Intercept applied) and MR as stored: integers, equal exactly.
        assert image.GetPixelID() in (sitk.sitkInt16, sitk.sitkInt32)
        np.testing.assert_array_equal(values, target)


# --------------------------------------------------------------------------------------------
# 2. Bad input
# --------------------------------------------------------------------------------------------


def _copy_series(source: Path, folder: Path, prefix: str = "") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in sorted(source.iterdir()):
        copies.append(Path(shutil.copy(path, folder / f"{prefix}{path.name}")))
    return copies


@pytest.mark.parametrize("keep_bytes", [200, -5000], ids=["header-cut", "pixels-cut"])
def test_truncated_slice_is_refused_naming_the_file(tmp_path: Path, keep_bytes: int) -> None:
    # Prepare: a copy of the series with one slice in the middle truncated
    files = _copy_series(sts("dicom", "STS_008", "MR_T1", "image"), tmp_path / "series")
    victim = files[len(files) // 2]
    data = victim.read_bytes()
    victim.write_bytes(data[:keep_bytes])
    # Execute
    with pytest.raises(CaseError) as err:
        read_dicom_series(tmp_path / "series")
    # Assert: refused (GDCM alone would skip the file and stack the others)
    assert err.value.reason is SkipReason.IMAGE_UNREADABLE
    assert victim.name in err.value.detail


def test_missing_slice_is_refused(tmp_path: Path) -> None:
    files = _copy_series(sts("dicom", "STS_008", "MR_T1", "image"), tmp_path / "series")
    ordered = list_series(tmp_path / "series")
    (only,) = ordered.values()
    assert len(only) == len(files)
    only[len(only) // 2].unlink()
    with pytest.raises(CaseError) as err:
        read_dicom_series(tmp_path / "series")
    assert err.value.reason is SkipReason.IMAGE_UNREADABLE
    assert "uneven slice spacing" in err.value.detail


def test_two_series_in_one_folder_need_a_series_uid(tmp_path: Path) -> None:
    # Prepare: CT and MR slices (and the RTSTRUCT, which is no series) in one folder
    folder = tmp_path / "mixed"
    _copy_series(sts("dicom", "STS_019", "CT", "image"), folder, "ct_")
    _copy_series(sts("dicom", "STS_019", "MR_T1", "image"), folder, "mr_")
    shutil.copy(sts("dicom", "STS_019", "CT", "mask", "RS.dcm"), folder / "RS.dcm")
    # Execute
    found = list_series(folder)
    # Assert
    assert len(found) == 2
    with pytest.raises(CaseError) as err:
        read_dicom_series(folder)
    assert err.value.reason is SkipReason.SERIES_NOT_FOUND
    assert "series_uid" in err.value.detail
    assert all(uid in err.value.detail for uid in found)
    sizes = set()
    for uid, files in found.items():
        image, header = read_dicom_series(folder, uid)
        assert str(header.SeriesInstanceUID) == uid
        assert image.GetSize()[2] == len(files)
        sizes.add(image.GetSize())
    assert sizes == {series("STS_019", "CT")[0].GetSize(), series("STS_019", "MR_T1")[0].GetSize()}
    with pytest.raises(CaseError) as err:
        read_dicom_series(folder, "1.2.3.4")
    assert err.value.reason is SkipReason.SERIES_NOT_FOUND
    assert "1.2.3.4" in err.value.detail and str(folder) in err.value.detail


def test_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CaseError) as err:
        read_dicom_series(tmp_path / "nowhere")
    assert err.value.reason is SkipReason.FILE_MISSING
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not DICOM")
    with pytest.raises(CaseError) as err:
        read_dicom_series(tmp_path / "empty")
    assert err.value.reason is SkipReason.IMAGE_UNREADABLE
    assert str(tmp_path / "empty") in err.value.detail



def test_is_dicom_file_and_modality(tmp_path: Path) -> None:
    ct_slice = sorted(sts("dicom", "STS_002", "CT", "image").iterdir())[0]
    text = tmp_path / "a.txt"
    text.write_text("hello")
    assert is_dicom_file(ct_slice) and not is_dicom_file(text)
    assert not is_dicom_file(tmp_path / "missing.dcm")
    assert dicom_modality(ct_slice) == "CT"
    assert dicom_modality(sts("dicom", "STS_002", "CT", "mask", "RS.dcm")) == "RTSTRUCT"
    assert dicom_modality(text) is None
