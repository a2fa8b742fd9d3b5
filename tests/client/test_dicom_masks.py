"""client.dicom.masks on the real sarcoma CT / T1 MR / PET series: RTSTRUCT against the published
NIfTI masks, synthetic contours with a hole, broken or wrong masks, and a DICOM SEG round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from client.dicom.files import dicom_modality
from client.dicom.masks import rtstruct_to_mask, seg_to_mask
from client.dicom.series import list_series
from common.errors import CaseError, SkipReason
from tests.client.dicom_fixtures import (
    CASES,
    SARCOMA_WARNINGS,
    roi_name,
    rtstruct_mask,
    same_grid,
    series,
    sts,
)

pytestmark = SARCOMA_WARNINGS


# --------------------------------------------------------------------------------------------
# 1. RTSTRUCT -> voxel mask against the published NIfTI mask
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("patient", "modality"), CASES)
def test_rtstruct_mask_matches_nifti_mask(patient: str, modality: str) -> None:
    # Prepare
    reference = sitk.ReadImage(str(sts("nifti", patient, f"{modality}_mask.nii.gz")))
    # Execute
    mask = rtstruct_mask(patient, modality)
    # Assert
    ours = sitk.GetArrayViewFromImage(mask).astype(bool)
    theirs = sitk.GetArrayViewFromImage(reference) > 0
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(mask))) <= {0, 1}
    if same_grid(mask, reference):
        # Same grid (the case for all 12 published cases): compare voxel counts, and since the
        # grids agree, voxel by voxel too (the NIfTI masks follow the same voxel-centre rule).
        ours_size, theirs_size = float(ours.sum()), float(theirs.sum())
        unit = "voxels"
        agreement = float((ours == theirs).mean())
    else:
        # Different grids (e.g. a NIfTI written on another crop or spacing): voxel counts are not
        # comparable, so compare physical volumes (count x voxel volume) instead.
        ours_size = float(ours.sum()) * float(np.prod(mask.GetSpacing()))
        theirs_size = float(theirs.sum()) * float(np.prod(reference.GetSpacing()))
        unit = "mm^3"
        agreement = None
    relative = (ours_size - theirs_size) / theirs_size
    print(f"{patient} {modality}: RTSTRUCT {ours_size:.0f} vs NIfTI {theirs_size:.0f} {unit} "
          f"({100 * relative:+.3f} %)")
    assert ours_size > 0
    assert abs(relative) <= 0.01
    if agreement is not None:
        assert agreement > 0.999


def test_rtstruct_mask_has_the_reference_geometry() -> None:
    image, _ = series("STS_019", "PET")
    mask = rtstruct_mask("STS_019", "PET")
    assert mask.GetSize() == image.GetSize()
    assert mask.GetSpacing() == image.GetSpacing()
    assert mask.GetOrigin() == image.GetOrigin()
    assert mask.GetDirection() == image.GetDirection()


def test_rtstruct_roi_name_matches_case_insensitively() -> None:
    image, _ = series("STS_002", "CT")
    lower = rtstruct_to_mask(sts("dicom", "STS_002", "CT", "mask", "RS.dcm"), image,
                             "gtv_mass_ct")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lower),
                                  sitk.GetArrayFromImage(rtstruct_mask("STS_002", "CT")))


def test_rtstruct_contours_off_the_grid_give_an_empty_mask() -> None:
    # Prepare: a small grid far away from the tumour
    grid = sitk.Image([8, 8, 4], sitk.sitkInt16)
    grid.SetOrigin((5000.0, 5000.0, 5000.0))
    # Execute
    mask = rtstruct_to_mask(sts("dicom", "STS_002", "CT", "mask", "RS.dcm"), grid,
                            "GTV_Mass_CT")
    # Assert
    assert mask.GetSize() == (8, 8, 4) and sitk.GetArrayViewFromImage(mask).sum() == 0


def test_rtstruct_holes_combine_by_xor(tmp_path: Path) -> None:
    # Prepare: a synthetic RTSTRUCT with an outer 10x10 square and an inner 4x4 square on one slice
    grid = sitk.Image([20, 20, 3], sitk.sitkInt16)
    grid.SetSpacing((1.0, 1.0, 2.0))

    def square(lo: float, hi: float, z: float) -> list[float]:
        return [lo, lo, z, hi, lo, z, hi, hi, z, lo, hi, z]

    path = tmp_path / "rs.dcm"
    _write_rtstruct(path, "Ring", [square(2.5, 12.5, 2.0), square(5.5, 9.5, 2.0)])
    # Execute
    mask = sitk.GetArrayFromImage(rtstruct_to_mask(path, grid, "Ring"))
    # Assert: z = 2 mm is slice 1; voxel centres 3..12 inside the outer, 6..9 inside the hole
    assert mask[0].sum() == 0 and mask[2].sum() == 0
    assert mask[1].sum() == 10 * 10 - 4 * 4
    assert mask[1, 7, 7] == 0 and mask[1, 3, 3] == 1


def _write_rtstruct(path: Path, name: str, contours: list[list[float]]) -> None:
    ds = Dataset()
    ds.Modality = "RTSTRUCT"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    roi = Dataset()
    roi.ROINumber = 7
    roi.ROIName = name
    ds.StructureSetROISequence = [roi]
    items = []
    for points in contours:
        item = Dataset()
        item.ContourGeometricType = "CLOSED_PLANAR"
        item.NumberOfContourPoints = len(points) // 3
        item.ContourData = points
        items.append(item)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 7
    roi_contour.ContourSequence = items
    ds.ROIContourSequence = [roi_contour]
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------------------------
# 2. Bad input
# --------------------------------------------------------------------------------------------


def test_wrong_roi_name_lists_the_available_names() -> None:
    image, _ = series("STS_002", "CT")
    rs = sts("dicom", "STS_002", "CT", "mask", "RS.dcm")
    with pytest.raises(CaseError) as err:
        rtstruct_to_mask(rs, image, "Liver")
    assert err.value.reason is SkipReason.ROI_NOT_FOUND
    assert "Liver" in err.value.detail and str(rs) in err.value.detail
    assert "GTV_Mass_CT" in err.value.detail


def test_non_dicom_or_non_rtstruct_mask_is_unreadable(tmp_path: Path) -> None:
    image, _ = series("STS_002", "CT")
    junk = tmp_path / "RS.dcm"
    junk.write_bytes(b"this is not a DICOM file\n" * 20)
    with pytest.raises(CaseError) as err:
        rtstruct_to_mask(junk, image, "GTV_Mass_CT")
    assert err.value.reason is SkipReason.MASK_UNREADABLE and str(junk) in err.value.detail
    ct_slice = sorted(sts("dicom", "STS_002", "CT", "image").iterdir())[0]
    with pytest.raises(CaseError) as err:
        rtstruct_to_mask(ct_slice, image, "GTV_Mass_CT")
    assert err.value.reason is SkipReason.MASK_UNREADABLE



# --------------------------------------------------------------------------------------------
# 3. DICOM SEG round trip
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")  # highdicom on the sources' odd values
def test_seg_round_trip_equals_the_rtstruct_mask(tmp_path: Path) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    # Prepare: a SEG built from the STS_002 CT slices and their RTSTRUCT mask
    folder = sts("dicom", "STS_002", "CT", "image")
    image, _ = series("STS_002", "CT")
    expected = sitk.GetArrayFromImage(rtstruct_mask("STS_002", "CT"))
    (files,) = list_series(folder).values()  # in stacking order, as the array's z axis
    sources = [pydicom.dcmread(p) for p in files]
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="GTV_Mass",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=expected,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MyeloFed",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    assert int(seg.NumberOfFrames) < len(files)  # empty frames omitted: SEG covers some slices
    # Execute
    by_default = seg_to_mask(path, image)
    by_label = seg_to_mask(path, image, "gtv_mass")
    by_number = seg_to_mask(path, image, 1)
    # Assert
    assert dicom_modality(path) == "SEG"
    for mask in (by_default, by_label, by_number):
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert same_grid(mask, image)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), expected)
    with pytest.raises(CaseError) as err:
        seg_to_mask(path, image, "Liver")
    assert err.value.reason is SkipReason.ROI_NOT_FOUND and "GTV_Mass" in err.value.detail
    with pytest.raises(CaseError) as err:
        seg_to_mask(sts("dicom", "STS_002", "CT", "mask", "RS.dcm"), image)
    assert err.value.reason is SkipReason.MASK_UNREADABLE


def test_an_rtstruct_of_another_patient_or_series_is_a_mask_mismatch():
    """STS_002's CT with STS_008's RTSTRUCT was only caught as an empty mask (or not at all,
    where the contours happened to fall inside the image): the references are checked now."""
    from client.loading import read_mask
    from client.manifest import CaseSpec
    from common.protocol import IngestionSpec

    image, header = series("STS_002", "CT")
    ingestion = IngestionSpec(rtstruct_roi="GTV_Mass_CT")

    def case(patient: str, modality: str) -> CaseSpec:
        return CaseSpec(case_id="c", row=2, image=sts("dicom", "STS_002", "CT", "image"),
                        mask=sts("dicom", patient, modality, "mask", "RS.dcm"), label=1.0,
                        batch="s", roi=roi_name(modality))

    # its own RTSTRUCT passes
    assert sitk.GetArrayViewFromImage(read_mask(case("STS_002", "CT"), image, ingestion, None,
                                                header)).any()
    with pytest.raises(CaseError) as other_patient:
        read_mask(case("STS_008", "CT"), image, ingestion, None, header)
    assert other_patient.value.reason is SkipReason.MASK_MISMATCH
    assert "refers to patient STS_008; the image is of patient STS_002" in \
        other_patient.value.detail
    # the same patient's PET contours: another frame of reference and series
    with pytest.raises(CaseError) as other_series:
        read_mask(case("STS_002", "PET"), image, ingestion, None, header)
    assert other_series.value.reason is SkipReason.MASK_MISMATCH
