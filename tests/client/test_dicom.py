"""client.dicom on the real sarcoma CT / T1 MR / PET series (DICOM + RTSTRUCT against the
published NIfTI), on made-up PET headers, on broken inputs and on a DICOM SEG round trip."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from client.dicom.files import dicom_modality, is_dicom_file
from client.dicom.masks import rtstruct_to_mask, seg_to_mask
from client.dicom.series import list_series, read_dicom_series
from client.dicom.suv import suv_factor_body_weight
from common.errors import CaseError, SkipReason

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
STS = DATA / "sts"
PATIENTS = ("STS_002", "STS_008", "STS_012", "STS_019")
MODALITIES = ("CT", "MR_T1", "PET")
CASES = [(p, m) for p in PATIENTS for m in MODALITIES]

# The sarcoma files trip pydicom's value-length checks (e.g. an 18-character SH): harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:The value length:UserWarning")


def sts(*parts: str) -> Path:
    """A path under ../shared/data/sts, or skip with a clear message when it is absent."""
    path = STS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared sarcoma test data not found at {path} (put shared/ beside the repo)")
    return path


def roi_name(modality: str) -> str:
    # The RTSTRUCTs name their single ROI per modality: GTV_Mass_CT, GTV_Mass_MR_T1, GTV_Mass_PET.
    return f"GTV_Mass_{modality}"


@functools.cache
def _series(patient: str, modality: str) -> tuple[sitk.Image, pydicom.Dataset]:
    return read_dicom_series(STS / "dicom" / patient / modality / "image")


def series(patient: str, modality: str) -> tuple[sitk.Image, pydicom.Dataset]:
    sts("dicom", patient, modality, "image")
    return _series(patient, modality)


@functools.cache
def _rtstruct_mask(patient: str, modality: str) -> sitk.Image:
    image, _ = _series(patient, modality)
    return rtstruct_to_mask(
        STS / "dicom" / patient / modality / "mask" / "RS.dcm", image, roi_name(modality)
    )


def rtstruct_mask(patient: str, modality: str) -> sitk.Image:
    sts("dicom", patient, modality, "mask", "RS.dcm")
    series(patient, modality)
    return _rtstruct_mask(patient, modality)


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Same size; spacing, origin, direction equal to well under a voxel (NIfTI keeps float32)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5, atol=1e-5)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    )


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
# 2. DICOM series -> image against the published NIfTI image
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
# 3. SUV body-weight factor on made-up headers
# --------------------------------------------------------------------------------------------


def _pet_header(**changes: object) -> Dataset:
    """80 kg, 370 MBq of F-18 injected at 10:15, series start at 11:15 (one hour later)."""
    ds = Dataset()
    ds.Modality = "PT"
    ds.Units = "BQML"
    ds.DecayCorrection = "START"
    ds.PatientWeight = "80"
    ds.SeriesTime = "111500.000000"
    ds.AcquisitionTime = "111500.000000"
    info = Dataset()
    info.RadionuclideTotalDose = "370000000"
    info.RadionuclideHalfLife = "6586.2"
    info.RadiopharmaceuticalStartTime = "101500.000000"
    ds.RadiopharmaceuticalInformationSequence = [info]
    for key, value in changes.items():
        target = info if key in ("RadionuclideTotalDose", "RadionuclideHalfLife",
                                 "RadiopharmaceuticalStartTime",
                                 "RadiopharmaceuticalStartDateTime") else ds
        if value is None:
            if key in target:
                delattr(target, key)
        elif isinstance(value, bytes):  # a raw, unparsed value, as read from a file
            tag = pydicom.datadict.tag_for_keyword(key)
            target[tag] = RawDataElement(Tag(tag), None, len(value), value, 0, True, True)
        else:
            setattr(target, key, value)
    return ds


# By hand: dose at 11:15 = 370e6 * 2 ** (-3600 / 6586.2) = 253 314 180.24 Bq;
# factor = 80 000 g / 253 314 180.24 Bq = 3.158133505e-4 g/Bq.
ONE_HOUR_FACTOR = 3.158133505344494e-4


def test_suv_factor_decays_the_dose_to_the_series_start() -> None:
    assert suv_factor_body_weight(_pet_header()) == pytest.approx(ONE_HOUR_FACTOR, rel=1e-9)


def test_suv_factor_falls_back_to_acquisition_time_and_start_datetime() -> None:
    header = _pet_header(SeriesTime=None, RadiopharmaceuticalStartTime=None,
                         RadiopharmaceuticalStartDateTime="20240101101500.00+0100")
    assert suv_factor_body_weight(header) == pytest.approx(ONE_HOUR_FACTOR, rel=1e-9)


def test_suv_factor_without_decay_for_admin() -> None:
    header = _pet_header(DecayCorrection="ADMIN")
    assert suv_factor_body_weight(header) == pytest.approx(80_000 / 370e6, rel=1e-12)


def test_suv_factor_is_one_for_gml() -> None:
    assert suv_factor_body_weight(_pet_header(Units="GML", PatientWeight=None)) == 1.0


def test_suv_factor_crosses_midnight() -> None:
    # Injection 23:30, series 00:30 the next day: one hour of decay, not minus 23 hours.
    header = _pet_header(RadiopharmaceuticalStartTime="233000", SeriesTime="003000.000000")
    assert suv_factor_body_weight(header) == pytest.approx(ONE_HOUR_FACTOR, rel=1e-9)


@pytest.mark.parametrize(
    ("change", "tag"),
    [
        ({"PatientWeight": None}, "PatientWeight"),
        ({"PatientWeight": "0"}, "PatientWeight"),
        ({"PatientWeight": b"heavy "}, "PatientWeight"),
        ({"RadionuclideTotalDose": None}, "RadionuclideTotalDose"),
        ({"RadionuclideHalfLife": b"abc "}, "RadionuclideHalfLife"),
        ({"RadiopharmaceuticalStartTime": None}, "RadiopharmaceuticalStartTime"),
        ({"SeriesTime": None, "AcquisitionTime": None}, "SeriesTime"),
        ({"DecayCorrection": None}, "DecayCorrection"),
        ({"Units": "CNTS"}, "Units"),
        ({"RadiopharmaceuticalInformationSequence": []}, "RadiopharmaceuticalInformationSequence"),
    ],
)
def test_suv_factor_names_the_missing_tag(change: dict, tag: str) -> None:
    with pytest.raises(CaseError) as err:
        suv_factor_body_weight(_pet_header(**change))
    assert err.value.reason is SkipReason.SUV_TAGS_MISSING
    assert tag in err.value.detail


# --------------------------------------------------------------------------------------------
# 4. Bad input
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


def test_is_dicom_file_and_modality(tmp_path: Path) -> None:
    ct_slice = sorted(sts("dicom", "STS_002", "CT", "image").iterdir())[0]
    text = tmp_path / "a.txt"
    text.write_text("hello")
    assert is_dicom_file(ct_slice) and not is_dicom_file(text)
    assert not is_dicom_file(tmp_path / "missing.dcm")
    assert dicom_modality(ct_slice) == "CT"
    assert dicom_modality(sts("dicom", "STS_002", "CT", "mask", "RS.dcm")) == "RTSTRUCT"
    assert dicom_modality(text) is None


# --------------------------------------------------------------------------------------------
# 5. DICOM SEG round trip
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
