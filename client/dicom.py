"""DICOM ingestion: image series, PET SUV factor, RTSTRUCT and DICOM SEG masks.

Every function here is pure (no printing, no file writing). Any problem with one case's files is
raised as a :class:`~common.errors.CaseError` whose detail names the file (or folder) and the
reason, so that the site skips that case and goes on.

Axis conventions (SimpleITK): an index or continuous index is ``(x, y, z)`` = (column, row,
slice), while :func:`SimpleITK.GetArrayFromImage` gives arrays ordered ``(z, y, x)``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from common.errors import CaseError, SkipReason

__all__ = [
    "list_series",
    "read_dicom_series",
    "suv_factor_body_weight",
    "rtstruct_to_mask",
    "seg_to_mask",
    "is_dicom_file",
    "dicom_modality",
]

#: Modalities of DICOM objects that are not images of a series (never counted as a series).
NON_IMAGE_MODALITIES = frozenset(
    {"RTSTRUCT", "SEG", "RTPLAN", "RTRECORD", "RTDOSE", "SR", "PR", "KO", "REG", "DOC", "RWV",
     "RTIMAGE"}
)

_RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

#: Slice gaps may differ from the median gap by this fraction (plus an absolute 0.01 mm).
_SPACING_TOLERANCE = 0.01

#: How far (in voxels) a SEG frame position may lie from a reference voxel centre.
_SEG_POSITION_TOLERANCE = 0.1


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def is_dicom_file(path: Path) -> bool:
    """Tell whether a file carries the DICOM Part 10 preamble (``DICM`` at byte 128).

    Parameters
    ----------
    path
        Any path.

    Returns
    -------
    bool
        True when ``path`` is a readable file whose bytes 128-131 are ``b"DICM"``. Cheap: reads
        132 bytes at most. Raw DICOM files without the preamble are not recognised.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_modality(path: Path) -> str | None:
    """The Modality (0008,0060) of one DICOM file.

    Parameters
    ----------
    path
        A DICOM file.

    Returns
    -------
    str or None
        E.g. ``"CT"``, ``"PT"``, ``"RTSTRUCT"``, ``"SEG"``; None when the file cannot be read as
        DICOM or has no Modality.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except Exception:  # noqa: BLE001 - any failure to parse means "not a readable DICOM file"
        return None
    value = ds.get("Modality")
    return str(value).strip() or None if value is not None else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _read_header(path: Path) -> pydicom.Dataset:
    """Header of one file (no pixels); raises the parser's exception on failure."""
    return pydicom.dcmread(path, stop_before_pixels=True)


def _is_image_header(ds: pydicom.Dataset) -> bool:
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality in NON_IMAGE_MODALITIES:
        return False
    if str(ds.get("SOPClassUID", "")) in (_RTSTRUCT_SOP_CLASS, _SEG_SOP_CLASS):
        return False
    return "Rows" in ds and "Columns" in ds


# --------------------------------------------------------------------------------------------
# Image series
# --------------------------------------------------------------------------------------------


def list_series(folder: Path) -> dict[str, list[Path]]:
    """The DICOM image series found in one folder (not recursive).

    Parameters
    ----------
    folder
        A folder of DICOM files.

    Returns
    -------
    dict of str to list of Path
        SeriesInstanceUID -> the series' files in GDCM's order (sorted along the slice normal,
        i.e. the order in which they are stacked). Objects that are not images (RTSTRUCT, SEG,
        RT plans, structured reports...) are not counted as series. Empty when the folder holds
        no readable image series (or does not exist).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    reader = sitk.ImageSeriesReader()
    series: dict[str, list[Path]] = {}
    for uid in reader.GetGDCMSeriesIDs(str(folder)):
        files = [Path(f) for f in reader.GetGDCMSeriesFileNames(str(folder), uid)]
        if not files:
            continue
        try:
            head = pydicom.dcmread(
                files[0], stop_before_pixels=True,
                specific_tags=["Modality", "SOPClassUID", "Rows", "Columns"],
            )
        except Exception:  # noqa: BLE001 - GDCM could list it: keep it, reading will tell
            series[uid] = files
            continue
        if _is_image_header(head):
            series[uid] = files
    return series


def _check_folder_files(folder: Path, uid: str, listed_files: list[Path]) -> None:
    """Refuse the series when a DICOM file of the folder was dropped by GDCM (unreadable or
    truncated) or belongs to the series without being in GDCM's list (``listed_files``: the files
    of every series GDCM found)."""
    listed = {p.resolve() for p in listed_files}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.resolve() in listed or not is_dicom_file(path):
            continue
        try:
            ds = _read_header(path)
        except Exception as exc:  # noqa: BLE001
            raise CaseError(
                SkipReason.IMAGE_UNREADABLE,
                f"DICOM folder '{folder}': file '{path.name}' is unreadable ({_first_line(exc)})",
            ) from None
        if "SOPClassUID" not in ds or "Modality" not in ds:
            raise CaseError(
                SkipReason.IMAGE_UNREADABLE,
                f"DICOM folder '{folder}': file '{path.name}' is incomplete (no SOP class or "
                "modality: truncated?)",
            )
        if str(ds.get("SeriesInstanceUID", "")) == uid or (
            _is_image_header(ds) and "SeriesInstanceUID" not in ds
        ):
            raise CaseError(
                SkipReason.IMAGE_UNREADABLE,
                f"DICOM folder '{folder}': slice '{path.name}' of series {uid} could not be read "
                "by the series reader (truncated or corrupt file)",
            )


def _check_headers(folder: Path, files: list[Path]) -> pydicom.Dataset:
    """Read every slice header, check that the slices are evenly spaced; return the first."""
    headers: list[pydicom.Dataset] = []
    for path in files:
        try:
            ds = _read_header(path)
        except Exception as exc:  # noqa: BLE001
            raise CaseError(
                SkipReason.IMAGE_UNREADABLE,
                f"DICOM folder '{folder}': slice '{path.name}' is unreadable ({_first_line(exc)})",
            ) from None
        headers.append(ds)
    first = headers[0]
    if len(headers) < 3 or "ImageOrientationPatient" not in first:
        return first
    try:
        orientation = np.asarray([float(v) for v in first.ImageOrientationPatient], dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        positions = np.array(
            [float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for ds in headers]
        )
    except (AttributeError, ValueError, TypeError) as exc:
        raise CaseError(
            SkipReason.IMAGE_UNREADABLE,
            f"DICOM folder '{folder}': a slice lacks a valid ImagePositionPatient or "
            f"ImageOrientationPatient ({_first_line(exc)})",
        ) from None
    order = np.argsort(positions)
    gaps = np.diff(positions[order])
    median = float(np.median(gaps))
    if median <= 0:
        raise CaseError(
            SkipReason.IMAGE_UNREADABLE,
            f"DICOM folder '{folder}': several slices share one position (duplicate slices?)",
        )
    bad = np.flatnonzero(np.abs(gaps - median) > _SPACING_TOLERANCE * median + 0.01)
    if bad.size:
        i = int(bad[0])
        a, b = files[int(order[i])].name, files[int(order[i + 1])].name
        raise CaseError(
            SkipReason.IMAGE_UNREADABLE,
            f"DICOM folder '{folder}': uneven slice spacing: {gaps[i]:.3f} mm between "
            f"'{a}' and '{b}' against {median:.3f} mm elsewhere (missing or duplicate slice?)",
        )
    return first


def read_dicom_series(
    folder: Path, series_uid: str | None = None
) -> tuple[sitk.Image, pydicom.Dataset]:
    """Read one DICOM image series as a 3D volume.

    Every file of the series must be readable and the slices evenly spaced: a series with a
    missing, truncated or duplicate slice is refused (GDCM would otherwise skip the bad file
    silently and stack the rest).

    Parameters
    ----------
    folder
        The folder holding the series' files.
    series_uid
        The SeriesInstanceUID to read; may be None when the folder holds one series only.

    Returns
    -------
    image : SimpleITK.Image
        The 3D volume with RescaleSlope/Intercept applied (CT in HU). PET (Modality ``PT``) is
        float32; other modalities keep SimpleITK's type, made signed where it was unsigned.
    header : pydicom.Dataset
        The first slice's header (read with ``stop_before_pixels=True``).

    Raises
    ------
    CaseError
        ``FILE_MISSING`` (no such folder), ``SERIES_NOT_FOUND`` (several series and no uid, or an
        unknown uid), ``IMAGE_UNREADABLE`` (no series, corrupt/truncated files, uneven slices).
    """
    folder = Path(folder)
    if not folder.exists():
        raise CaseError(SkipReason.FILE_MISSING, f"DICOM folder '{folder}' does not exist")
    if not folder.is_dir():
        raise CaseError(
            SkipReason.IMAGE_UNREADABLE, f"DICOM series path '{folder}' is not a folder"
        )
    try:
        series = list_series(folder)
    except RuntimeError as exc:
        raise CaseError(
            SkipReason.IMAGE_UNREADABLE,
            f"DICOM folder '{folder}' cannot be scanned: {_first_line(exc)}",
        ) from None
    if not series:
        raise CaseError(
            SkipReason.IMAGE_UNREADABLE,
            f"DICOM folder '{folder}' holds no readable DICOM image series",
        )
    if series_uid is None:
        if len(series) > 1:
            raise CaseError(
                SkipReason.SERIES_NOT_FOUND,
                f"DICOM folder '{folder}' holds {len(series)} series "
                f"({', '.join(sorted(series))}); set the manifest's series_uid column to pick one",
            )
        uid = next(iter(series))
    else:
        uid = str(series_uid).strip()
        if uid not in series:
            raise CaseError(
                SkipReason.SERIES_NOT_FOUND,
                f"series {uid} not found in DICOM folder '{folder}' (found: "
                f"{', '.join(sorted(series))})",
            )
    files = series[uid]
    _check_folder_files(folder, uid, [p for group in series.values() for p in group])
    header = _check_headers(folder, files)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in files])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise CaseError(
            SkipReason.IMAGE_UNREADABLE,
            f"DICOM series {uid} in '{folder}' cannot be read: {_first_line(exc)}",
        ) from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(
            SkipReason.IMAGE_UNREADABLE,
            f"DICOM series {uid} in '{folder}' is {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s); expected a 3D scalar volume",
        )
    modality = str(header.get("Modality", "")).strip().upper()
    if modality == "PT":
        image = sitk.Cast(image, sitk.sitkFloat32)
    else:
        signed = {
            sitk.sitkUInt8: sitk.sitkInt16,
            sitk.sitkUInt16: sitk.sitkInt32,
            sitk.sitkUInt32: sitk.sitkInt64,
        }.get(image.GetPixelID())
        if signed is not None:
            image = sitk.Cast(image, signed)
    return image, header


# --------------------------------------------------------------------------------------------
# PET SUV
# --------------------------------------------------------------------------------------------

_TM_RE = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")


def _seconds_of_day(value: object) -> float | None:
    """Seconds since midnight of a DICOM TM ("HHMMSS.FFFFFF", "HHMM", "HH:MM:SS"), or None."""
    text = str(value).strip().replace(":", "")
    match = _TM_RE.match(text)
    if not match:
        return None
    hours = int(match.group(1))
    minutes = int(match.group(2) or 0)
    seconds = int(match.group(3) or 0)
    fraction = float(match.group(4)) if match.group(4) else 0.0
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    return hours * 3600.0 + minutes * 60.0 + seconds + fraction


def _seconds_of_day_from_dt(value: object) -> float | None:
    """Seconds since midnight of the time part of a DICOM DT ("YYYYMMDDHHMMSS.FFFFFF&ZZXX")."""
    text = re.split(r"[+-]", str(value).strip(), maxsplit=1)[0]
    if len(text) < 10 or not text[:8].isdigit():
        return None
    return _seconds_of_day(text[8:])


def _positive_float(ds: pydicom.Dataset, keyword: str, where: str) -> float:
    if keyword not in ds:
        raise CaseError(SkipReason.SUV_TAGS_MISSING, f"PET header: {where}{keyword} is missing")
    try:
        raw = ds[keyword].value  # converting a raw element may itself fail (e.g. DS "abc")
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise CaseError(
                SkipReason.SUV_TAGS_MISSING, f"PET header: {where}{keyword} is missing"
            )
        value = float(raw)
    except (TypeError, ValueError) as exc:
        raise CaseError(
            SkipReason.SUV_TAGS_MISSING,
            f"PET header: {where}{keyword} is not a number ({_first_line(exc)})",
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise CaseError(
            SkipReason.SUV_TAGS_MISSING,
            f"PET header: {where}{keyword} = {value!r} is not a positive number",
        )
    return value


def suv_factor_body_weight(header: pydicom.Dataset) -> float:
    """Factor turning PET activity concentration (Bq/mL) into SUV body weight.

    ``SUVbw = activity * weight_g / dose_at_reference``, where the injected dose is decay
    corrected to the time the image values refer to: the series start for ``DecayCorrection``
    ``START`` (SeriesTime, else AcquisitionTime), the injection itself for ``ADMIN``.
    Times of day are used (dates in anonymised data are often shifted independently); a scan time
    earlier than the injection time is taken to be on the next day (midnight crossing).

    Parameters
    ----------
    header
        The header of a slice of the PET series.

    Returns
    -------
    float
        The multiplicative factor (g/Bq, giving g/mL); 1.0 when ``Units`` is already ``GML``.

    Raises
    ------
    CaseError
        ``SUV_TAGS_MISSING`` naming the tag that is missing or invalid: Units (must be BQML or
        GML), PatientWeight, RadiopharmaceuticalInformationSequence, RadionuclideTotalDose,
        RadionuclideHalfLife, RadiopharmaceuticalStartTime/DateTime, DecayCorrection, SeriesTime.
    """
    units = str(header.get("Units", "")).strip().upper()
    if units == "GML":
        return 1.0
    if not units:
        raise CaseError(SkipReason.SUV_TAGS_MISSING, "PET header: Units is missing")
    if units != "BQML":
        raise CaseError(
            SkipReason.SUV_TAGS_MISSING,
            f"PET header: Units = {units!r}; only BQML (or GML, already SUV) can be converted",
        )
    weight_kg = _positive_float(header, "PatientWeight", "")
    sequence = header.get("RadiopharmaceuticalInformationSequence")
    if not sequence:
        raise CaseError(
            SkipReason.SUV_TAGS_MISSING,
            "PET header: RadiopharmaceuticalInformationSequence is missing or empty",
        )
    item = sequence[0]
    where = "RadiopharmaceuticalInformationSequence[0]."
    dose = _positive_float(item, "RadionuclideTotalDose", where)
    decay = str(header.get("DecayCorrection", "")).strip().upper()
    if decay == "ADMIN":
        return weight_kg * 1000.0 / dose
    if not decay:
        raise CaseError(SkipReason.SUV_TAGS_MISSING, "PET header: DecayCorrection is missing")
    if decay != "START":
        raise CaseError(
            SkipReason.SUV_TAGS_MISSING,
            f"PET header: DecayCorrection = {decay!r}; only START or ADMIN are supported",
        )
    half_life = _positive_float(item, "RadionuclideHalfLife", where)
    injection = None
    if item.get("RadiopharmaceuticalStartTime"):
        injection = _seconds_of_day(item.RadiopharmaceuticalStartTime)
    if injection is None and item.get("RadiopharmaceuticalStartDateTime"):
        injection = _seconds_of_day_from_dt(item.RadiopharmaceuticalStartDateTime)
    if injection is None:
        raise CaseError(
            SkipReason.SUV_TAGS_MISSING,
            f"PET header: {where}RadiopharmaceuticalStartTime (or ...StartDateTime) is missing "
            "or invalid",
        )
    scan = None
    for keyword in ("SeriesTime", "AcquisitionTime"):
        if header.get(keyword):
            scan = _seconds_of_day(header[keyword].value)
            if scan is not None:
                break
    if scan is None:
        raise CaseError(
            SkipReason.SUV_TAGS_MISSING,
            "PET header: SeriesTime (or AcquisitionTime) is missing or invalid",
        )
    elapsed = scan - injection
    if elapsed < 0:
        elapsed += 24 * 3600.0  # scan after midnight, injection before
    decayed_dose = dose * math.exp(-math.log(2.0) * elapsed / half_life)
    return weight_kg * 1000.0 / decayed_dose


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def _physical_to_index_matrix(reference: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """``(M, origin)`` such that ``continuous_index = (point - origin) @ M.T`` (x, y, z)."""
    direction = np.asarray(reference.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(reference.GetSpacing(), dtype=float)
    matrix = np.linalg.inv(direction @ np.diag(spacing))
    return matrix, np.asarray(reference.GetOrigin(), dtype=float)


def _empty_mask(reference: sitk.Image) -> np.ndarray:
    nx, ny, nz = reference.GetSize()
    return np.zeros((nz, ny, nx), dtype=np.uint8)


def _to_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    mask = sitk.GetImageFromArray(array.astype(np.uint8, copy=False))
    mask.CopyInformation(reference)
    return mask


def _check_reference(reference: sitk.Image, path: Path) -> None:
    if reference.GetDimension() != 3:
        raise CaseError(
            SkipReason.GEOMETRY_MISMATCH,
            f"mask '{path}': the reference image is {reference.GetDimension()}D, not 3D",
        )


def _pick_name(names: list[str], wanted: str) -> int | None:
    """Index of ``wanted`` in ``names``: exact match first, then case-insensitive (unique)."""
    if wanted in names:
        return names.index(wanted)
    folded = [i for i, n in enumerate(names) if n.strip().casefold() == wanted.strip().casefold()]
    return folded[0] if len(folded) == 1 else None


def rtstruct_to_mask(rtstruct_path: Path, reference: sitk.Image, roi_name: str) -> sitk.Image:
    """Rasterize one ROI of an RTSTRUCT onto the grid of a reference image.

    Each CLOSED_PLANAR contour is mapped to the reference's continuous index, assigned to the
    slice ``round(z_index)`` and filled with :func:`skimage.draw.polygon` (voxels whose centre
    lies inside the polygon). Contours on one slice combine by XOR (even-odd), so holes drawn as
    inner contours stay empty. Contours off the grid are ignored.

    Parameters
    ----------
    rtstruct_path
        The RTSTRUCT file.
    reference
        The 3D image whose grid the mask takes (size, spacing, origin, direction).
    roi_name
        The StructureSetROISequence ROIName; an exact match is preferred, then a unique
        case-insensitive one.

    Returns
    -------
    SimpleITK.Image
        ``sitkUInt8``, 1 inside and 0 outside, with the reference's geometry. Empty when the
        ROI has no contour on the grid (the caller checks emptiness).

    Raises
    ------
    CaseError
        ``MASK_UNREADABLE`` (not an RTSTRUCT, unreadable, malformed contour data),
        ``ROI_NOT_FOUND`` (no ROI of that name; the message lists the names available),
        ``GEOMETRY_MISMATCH`` (a contour not parallel to the reference's slices),
        ``FILE_MISSING`` (no such file).
    """
    from skimage.draw import polygon  # local: skimage import is slow-ish and only needed here

    path = Path(rtstruct_path)
    _check_reference(reference, path)
    if not path.is_file():
        raise CaseError(SkipReason.FILE_MISSING, f"RTSTRUCT '{path}' does not exist")
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise CaseError(
            SkipReason.MASK_UNREADABLE, f"RTSTRUCT '{path}' cannot be read: {_first_line(exc)}"
        ) from None
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality != "RTSTRUCT" and str(ds.get("SOPClassUID", "")) != _RTSTRUCT_SOP_CLASS:
        raise CaseError(
            SkipReason.MASK_UNREADABLE,
            f"'{path}' is not RTSTRUCT (Modality {modality or 'missing'})",
        )
    try:
        rois = list(ds.StructureSetROISequence)
        names = [str(item.get("ROIName", "")) for item in rois]
    except AttributeError:
        raise CaseError(
            SkipReason.MASK_UNREADABLE, f"RTSTRUCT '{path}' has no StructureSetROISequence"
        ) from None
    chosen = _pick_name(names, roi_name)
    if chosen is None:
        raise CaseError(
            SkipReason.ROI_NOT_FOUND,
            f"RTSTRUCT '{path}' has no ROI named '{roi_name}' (available: "
            f"{', '.join(repr(n) for n in names) or 'none'})",
        )
    number = rois[chosen].get("ROINumber")

    out = _empty_mask(reference)
    nz, ny, nx = out.shape
    contours = []
    for item in ds.get("ROIContourSequence", []):
        if str(item.get("ReferencedROINumber")) == str(number):
            contours.extend(item.get("ContourSequence", []))
    matrix, origin = _physical_to_index_matrix(reference)
    for number_in_roi, contour in enumerate(contours):
        if str(contour.get("ContourGeometricType", "")).strip().upper() != "CLOSED_PLANAR":
            continue
        try:
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        except (AttributeError, ValueError, TypeError) as exc:
            raise CaseError(
                SkipReason.MASK_UNREADABLE,
                f"RTSTRUCT '{path}', ROI '{names[chosen]}': contour {number_in_roi} has invalid "
                f"ContourData ({_first_line(exc)})",
            ) from None
        if len(points) < 3 or not np.all(np.isfinite(points)):
            continue
        index = (points - origin) @ matrix.T  # (n, 3) continuous (x, y, z)
        z = index[:, 2]
        if float(z.max() - z.min()) > 1.0:
            raise CaseError(
                SkipReason.GEOMETRY_MISMATCH,
                f"RTSTRUCT '{path}', ROI '{names[chosen]}': contour {number_in_roi} is not in a "
                "slice plane of the image (spans "
                f"{float(z.max() - z.min()):.2f} slices)",
            )
        k = int(np.floor(float(z.mean()) + 0.5))
        if not 0 <= k < nz:
            continue
        rr, cc = polygon(index[:, 1], index[:, 0], shape=(ny, nx))
        if rr.size:
            fill = np.zeros((ny, nx), dtype=bool)
            fill[rr, cc] = True
            out[k] ^= fill
    return _to_image(out, reference)


def _segment_choice(
    path: Path, descriptions: list[tuple[int, str]], segment: str | int | None
) -> int:
    listing = ", ".join(f"{n}: '{label}'" for n, label in descriptions) or "none"
    if segment is None:
        if len(descriptions) == 1:
            return descriptions[0][0]
        raise CaseError(
            SkipReason.ROI_NOT_FOUND,
            f"SEG '{path}' holds {len(descriptions)} segments ({listing}); name the one to use",
        )
    if isinstance(segment, (int, np.integer)) and not isinstance(segment, bool):
        for number, _ in descriptions:
            if number == int(segment):
                return number
        raise CaseError(
            SkipReason.ROI_NOT_FOUND,
            f"SEG '{path}' has no segment number {int(segment)} (available: {listing})",
        )
    labels = [label for _, label in descriptions]
    chosen = _pick_name(labels, str(segment))
    if chosen is not None:
        return descriptions[chosen][0]
    text = str(segment).strip()
    if text.isdigit():
        for number, _ in descriptions:
            if number == int(text):
                return number
    raise CaseError(
        SkipReason.ROI_NOT_FOUND,
        f"SEG '{path}' has no segment labelled '{segment}' (available: {listing})",
    )


def seg_to_mask(
    seg_path: Path, reference: sitk.Image, segment: str | int | None = None
) -> sitk.Image:
    """Place one segment of a DICOM SEG on the grid of a reference image.

    Each frame of the chosen segment is matched to a reference slice through its
    ImagePositionPatient (physical point -> index); the SEG may cover only some slices. The SEG's
    frames must share the reference's in-plane grid (rows, columns, pixel spacing, orientation,
    position): this is the case for a SEG derived from the reference series.

    Parameters
    ----------
    seg_path
        The DICOM SEG file.
    reference
        The 3D image whose grid the mask takes.
    segment
        SegmentLabel (exact, then case-insensitive) or SegmentNumber; None picks the only
        segment.

    Returns
    -------
    SimpleITK.Image
        ``sitkUInt8`` {0, 1} with the reference's geometry. FRACTIONAL segments are thresholded
        at half their maximum value.

    Raises
    ------
    CaseError
        ``MASK_UNREADABLE`` (not a SEG, unreadable), ``ROI_NOT_FOUND`` (no such segment, or
        several segments and none named), ``GEOMETRY_MISMATCH`` (frames not on the reference's
        grid), ``FILE_MISSING`` (no such file).
    """
    import highdicom as hd  # local: heavy import, only needed for SEG input

    path = Path(seg_path)
    _check_reference(reference, path)
    if not path.is_file():
        raise CaseError(SkipReason.FILE_MISSING, f"SEG '{path}' does not exist")
    modality = dicom_modality(path)
    if modality != "SEG":
        raise CaseError(
            SkipReason.MASK_UNREADABLE,
            f"'{path}' is not a DICOM SEG (Modality {modality or 'unreadable'})",
        )
    try:
        seg = hd.seg.segread(path)
        descriptions = [
            (int(item.SegmentNumber), str(item.get("SegmentLabel", "")))
            for item in seg.SegmentSequence
        ]
    except Exception as exc:  # noqa: BLE001 - highdicom raises many types on malformed input
        raise CaseError(
            SkipReason.MASK_UNREADABLE, f"SEG '{path}' cannot be read: {_first_line(exc)}"
        ) from None
    number = _segment_choice(path, descriptions, segment)

    out = _empty_mask(reference)
    nz, ny, nx = out.shape
    where = f"SEG '{path}'"
    if int(seg.Rows) != ny or int(seg.Columns) != nx:
        raise CaseError(
            SkipReason.GEOMETRY_MISMATCH,
            f"{where}: frames are {seg.Columns}x{seg.Rows}, the image slices {nx}x{ny}",
        )
    try:
        seg_type = str(seg.SegmentationType).upper()
        shared = seg.get("SharedFunctionalGroupsSequence", [None])[0]
        frames = seg.PerFrameFunctionalGroupsSequence
        pixels = seg.pixel_array
        if pixels.ndim == 2:
            pixels = pixels[np.newaxis]
    except Exception as exc:  # noqa: BLE001
        raise CaseError(
            SkipReason.MASK_UNREADABLE, f"{where}: frames cannot be decoded: {_first_line(exc)}"
        ) from None

    def functional(group: pydicom.Dataset, name: str) -> pydicom.Dataset | None:
        for source in (group, shared):
            if source is not None and name in source and len(source[name].value):
                return source[name].value[0]
        return None

    matrix, origin = _physical_to_index_matrix(reference)
    ref_direction = np.asarray(reference.GetDirection(), dtype=float).reshape(3, 3)
    ref_spacing = np.asarray(reference.GetSpacing(), dtype=float)
    threshold = 0.5 * float(seg.get("MaximumFractionalValue", 1)) if seg_type == "FRACTIONAL" else 0
    for i, group in enumerate(frames):
        if seg_type == "LABELMAP":
            frame = pixels[i] == number
        else:
            ident = functional(group, "SegmentIdentificationSequence")
            if ident is None or int(ident.ReferencedSegmentNumber) != number:
                continue
            frame = pixels[i] > threshold
        position = functional(group, "PlanePositionSequence")
        orientation = functional(group, "PlaneOrientationSequence")
        measures = functional(group, "PixelMeasuresSequence")
        if position is None or "ImagePositionPatient" not in position:
            raise CaseError(
                SkipReason.MASK_UNREADABLE, f"{where}: frame {i + 1} has no ImagePositionPatient"
            )
        if orientation is not None and "ImageOrientationPatient" in orientation:
            iop = np.asarray([float(v) for v in orientation.ImageOrientationPatient])
            if np.abs(iop[:3] - ref_direction[:, 0]).max() > 1e-3 or (
                np.abs(iop[3:] - ref_direction[:, 1]).max() > 1e-3
            ):
                raise CaseError(
                    SkipReason.GEOMETRY_MISMATCH,
                    f"{where}: frame orientation {iop.tolist()} differs from the image's",
                )
        if measures is not None and "PixelSpacing" in measures:
            row_sp, col_sp = (float(v) for v in measures.PixelSpacing)
            if abs(col_sp - ref_spacing[0]) > 1e-3 * ref_spacing[0] or (
                abs(row_sp - ref_spacing[1]) > 1e-3 * ref_spacing[1]
            ):
                raise CaseError(
                    SkipReason.GEOMETRY_MISMATCH,
                    f"{where}: pixel spacing {[row_sp, col_sp]} differs from the image's "
                    f"{[ref_spacing[1], ref_spacing[0]]}",
                )
        index = (np.asarray([float(v) for v in position.ImagePositionPatient]) - origin) @ matrix.T
        k = int(np.floor(index[2] + 0.5))
        if (
            np.abs(index[:2]).max() > _SEG_POSITION_TOLERANCE
            or abs(index[2] - k) > _SEG_POSITION_TOLERANCE
            or not 0 <= k < nz
        ):
            raise CaseError(
                SkipReason.GEOMETRY_MISMATCH,
                f"{where}: frame {i + 1} at {list(position.ImagePositionPatient)} mm is not on a "
                f"slice of the image (index {np.round(index, 2).tolist()})",
            )
        out[k] |= frame.astype(np.uint8)
    return _to_image(out, reference)
