"""DICOM image series: listing those of a folder, and reading one as a 3D volume.

A series is read only when every file of it can be read and its slices are evenly spaced; GDCM
alone would skip a bad file silently and stack the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from client.dicom.files import RTSTRUCT_SOP_CLASS, SEG_SOP_CLASS, is_dicom_file, short_reason
from client.limits import MAX_CASE_VOXELS, Budget, check_voxels
from common.errors import CaseError, SkipReason

__all__ = ["list_series", "read_dicom_series"]

#: Modalities of DICOM objects that are not images of a series (never counted as a series).
NON_IMAGE_MODALITIES = frozenset(
    {"RTSTRUCT", "SEG", "RTPLAN", "RTRECORD", "RTDOSE", "SR", "PR", "KO", "REG", "DOC", "RWV",
     "RTIMAGE"}
)

#: Slice gaps may differ from the median gap by this fraction (plus an absolute 0.01 mm).
_SPACING_TOLERANCE = 0.01


def _read_header(path: Path) -> pydicom.Dataset:
    """Header of one file (no pixels); raises the parser's exception on failure."""
    return pydicom.dcmread(path, stop_before_pixels=True)


def _is_image_header(ds: pydicom.Dataset) -> bool:
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality in NON_IMAGE_MODALITIES:
        return False
    if str(ds.get("SOPClassUID", "")) in (RTSTRUCT_SOP_CLASS, SEG_SOP_CLASS):
        return False
    return "Rows" in ds and "Columns" in ds


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
                f"DICOM folder '{folder}': file '{path.name}' is unreadable ({short_reason(exc)})",
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
                f"DICOM folder '{folder}': slice '{path.name}' is unreadable ({short_reason(exc)})",
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
            f"ImageOrientationPatient ({short_reason(exc)})",
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
    folder: Path, series_uid: str | None = None, max_voxels: int | Budget = MAX_CASE_VOXELS
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
    max_voxels
        A series of more voxels (from its headers) is refused before its pixels are read.

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
        unknown uid), ``IMAGE_UNREADABLE`` (no series, corrupt/truncated files, uneven slices),
        ``RESOURCE_LIMIT`` (more than ``max_voxels``).
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
            f"DICOM folder '{folder}' cannot be scanned: {short_reason(exc)}",
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
    check_voxels((int(header.get("Columns", 0) or 0), int(header.get("Rows", 0) or 0),
                  len(files) * max(1, int(header.get("NumberOfFrames", 1) or 1))),
                 f"DICOM series {uid} in '{folder}'", max_voxels)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in files])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise CaseError(
            SkipReason.IMAGE_UNREADABLE,
            f"DICOM series {uid} in '{folder}' cannot be read: {short_reason(exc)}",
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
