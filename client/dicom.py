"""DICOM reading: image series, RTSTRUCT and SEG masks, PET SUV.

SimpleITK (GDCM) reads the pixel data; pydicom reads headers and RTSTRUCT contours; highdicom
reads DICOM SEG; scikit-image fills contour polygons. Every failure is a :class:`CaseError`
naming the file and the reason.

Axis conventions: a continuous index from SimpleITK is (x, y, z); a NumPy array from SimpleITK
is (z, y, x).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from skimage.draw import polygon as fill_polygon

from common.errors import CaseError, SkipReason

#: Modalities of DICOM objects that are not image slices.
NON_IMAGE_MODALITIES = frozenset({"RTSTRUCT", "SEG", "RTPLAN", "RTDOSE", "RTRECORD", "PR", "SR",
                                  "KO", "REG", "DOC"})
_UNCOMPRESSED = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})


def is_dicom_file(path: Path) -> bool:
    """True when the file carries the DICOM preamble ('DICM' at byte 128)."""
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def dicom_modality(path: Path) -> str | None:
    """The Modality of one DICOM file (e.g. 'CT', 'RTSTRUCT', 'SEG'), or None if unreadable."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    return str(ds.get("Modality", "")) or None


def _scan(folder: Path) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    """SeriesInstanceUID -> [(file, header)] for every image slice in ``folder``.

    A file with the DICOM preamble that cannot be parsed is an error naming the file: a series
    with a broken slice must not be read as if the slice did not exist.
    """
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if not is_dicom_file(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(ds.SeriesInstanceUID)
            modality = str(ds.get("Modality", ""))
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError,
                KeyError, TypeError) as exc:
            raise CaseError(
                SkipReason.IMAGE_UNREADABLE,
                f"DICOM file '{path}' is corrupt or truncated: {type(exc).__name__}: {exc}",
            ) from None
        if modality in NON_IMAGE_MODALITIES:
            continue
        series.setdefault(uid, []).append((path, ds))
    return series


def list_series(folder: Path) -> dict[str, list[Path]]:
    """SeriesInstanceUID -> the files of that image series in ``folder``."""
    return {uid: [p for p, _ in items] for uid, items in _scan(folder).items()}


def _check_slices(folder: Path, items: list[tuple[Path, pydicom.Dataset]]) -> list[Path]:
    """Sort slices along the slice normal; refuse truncated pixel data and gaps."""
    try:
        orientation = np.asarray(items[0][1].ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        positions = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)))
                     for _, ds in items]
    except (AttributeError, ValueError, TypeError) as exc:
        raise CaseError(SkipReason.IMAGE_UNREADABLE,
                        f"DICOM series in '{folder}' lacks slice geometry: {exc}") from None
    order = np.argsort(positions)
    files = [items[i][0] for i in order]
    for path in files:
        ds = pydicom.dcmread(path)
        if str(ds.file_meta.get("TransferSyntaxUID", "")) in _UNCOMPRESSED:
            expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                        * int(ds.BitsAllocated) // 8 * int(ds.get("NumberOfFrames", 1)))
            got = len(ds.get("PixelData", b"") or b"")
            if got < expected:
                raise CaseError(
                    SkipReason.IMAGE_UNREADABLE,
                    f"DICOM file '{path}' is truncated: {got} of {expected} pixel bytes",
                )
    if len(files) > 2:
        gaps = np.diff(np.sort(positions))
        step = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - step) > 0.01 * max(step, 1e-6))
        if step <= 0 or bad.size:
            where = ", ".join(f"after '{files[i].name}'" for i in bad[:3]) or "duplicate slices"
            raise CaseError(
                SkipReason.IMAGE_UNREADABLE,
                f"DICOM series in '{folder}' has uneven slice spacing (a slice missing?): {where}",
            )
    return files


def read_dicom_series(folder: Path, series_uid: str | None = None
                      ) -> tuple[sitk.Image, pydicom.Dataset]:
    """Read one image series as a 3D image (rescaled: HU for CT) and the first slice's header.

    Parameters
    ----------
    folder
        A folder of DICOM files, possibly holding several series and RTSTRUCT/SEG objects.
    series_uid
        The SeriesInstanceUID to read; required when the folder holds several image series.
    """
    if not folder.is_dir():
        raise CaseError(SkipReason.FILE_MISSING, f"DICOM folder '{folder}' does not exist")
    series = _scan(folder)
    if not series:
        raise CaseError(SkipReason.IMAGE_UNREADABLE, f"no DICOM image series in '{folder}'")
    if series_uid is None:
        if len(series) > 1:
            raise CaseError(
                SkipReason.SERIES_NOT_FOUND,
                f"'{folder}' holds {len(series)} series ({', '.join(sorted(series))}); set the "
                "manifest's series_uid column to pick one",
            )
        series_uid = next(iter(series))
    if series_uid not in series:
        raise CaseError(SkipReason.SERIES_NOT_FOUND,
                        f"series '{series_uid}' not found in '{folder}' "
                        f"(found: {', '.join(sorted(series))})")
    items = series[series_uid]
    files = _check_slices(folder, items)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise CaseError(SkipReason.IMAGE_UNREADABLE,
                        f"DICOM series in '{folder}' cannot be read: {last}") from None
    if image.GetDimension() != 3:
        raise CaseError(SkipReason.IMAGE_UNREADABLE,
                        f"DICOM series in '{folder}' is not a 3D volume")
    return image, pydicom.dcmread(files[0], stop_before_pixels=True)


def _dicom_time(value: object, tag: str) -> datetime:
    text = str(value).strip()
    if not text:
        raise ValueError(f"{tag} is empty")
    if len(text) >= 14 and text[:8].isdigit() and "." not in text[:8]:  # a DateTime (DT)
        return datetime.strptime(text[:14], "%Y%m%d%H%M%S")
    hhmmss = text.split(".")[0].ljust(6, "0")
    frac = float("0." + text.split(".")[1]) if "." in text else 0.0
    base = datetime.strptime(hhmmss[:6], "%H%M%S")
    return base + timedelta(seconds=frac)


def suv_factor_body_weight(header: pydicom.Dataset) -> float:
    """Factor from PET activity concentration (Bq/mL) to SUV body weight (g/mL).

    ``SUVbw = activity * weight_g / dose_at_scan``, with the injected dose decayed from the
    injection to the series start when ``DecayCorrection`` is START (ADMIN: already referred to
    the injection time). Images whose ``Units`` is already GML (SUV) give 1.0.
    """
    units = str(header.get("Units", "")).upper()
    if units == "GML":
        return 1.0
    if units and units != "BQML":
        raise CaseError(SkipReason.SUV_TAGS_MISSING,
                        f"PET Units is '{units}'; SUV needs BQML (or GML, already SUV)")

    def need(ds: pydicom.Dataset, tag: str) -> object:
        value = ds.get(tag)
        if value is None or str(value).strip() == "":
            raise CaseError(SkipReason.SUV_TAGS_MISSING, f"PET header lacks {tag}")
        return value

    weight_kg = float(need(header, "PatientWeight"))
    if weight_kg <= 0:
        raise CaseError(SkipReason.SUV_TAGS_MISSING, f"PatientWeight is {weight_kg}")
    sequence = header.get("RadiopharmaceuticalInformationSequence")
    if not sequence:
        raise CaseError(SkipReason.SUV_TAGS_MISSING,
                        "PET header lacks RadiopharmaceuticalInformationSequence")
    info = sequence[0]
    dose = float(need(info, "RadionuclideTotalDose"))
    half_life = float(need(info, "RadionuclideHalfLife"))
    if dose <= 0 or half_life <= 0:
        raise CaseError(SkipReason.SUV_TAGS_MISSING,
                        "RadionuclideTotalDose and RadionuclideHalfLife must be positive")
    decay = str(header.get("DecayCorrection", "START")).upper()
    if decay == "START":
        try:
            if info.get("RadiopharmaceuticalStartDateTime") and header.get("SeriesDate"):
                injected = _dicom_time(info.RadiopharmaceuticalStartDateTime,
                                       "RadiopharmaceuticalStartDateTime")
                scan = _dicom_time(f"{header.SeriesDate}{str(header.SeriesTime).split('.')[0]}",
                                   "SeriesDate/SeriesTime")
            else:
                injected = _dicom_time(need(info, "RadiopharmaceuticalStartTime"),
                                       "RadiopharmaceuticalStartTime")
                scan_time = header.get("SeriesTime") or need(header, "AcquisitionTime")
                scan = _dicom_time(scan_time, "SeriesTime")
                if scan < injected:  # the scan started after midnight
                    scan += timedelta(days=1)
        except ValueError as exc:
            raise CaseError(SkipReason.SUV_TAGS_MISSING, f"unreadable PET time: {exc}") from None
        elapsed = (scan - injected).total_seconds()
        dose = dose * 2.0 ** (-elapsed / half_life)
    elif decay != "ADMIN":
        raise CaseError(SkipReason.SUV_TAGS_MISSING,
                        f"DecayCorrection '{decay}' is not START or ADMIN")
    return weight_kg * 1000.0 / dose


def _physical_to_index(points_mm: np.ndarray, reference: sitk.Image) -> np.ndarray:
    """(N, 3) physical points -> (N, 3) continuous (x, y, z) indices of ``reference``."""
    direction = np.asarray(reference.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.asarray(reference.GetOrigin(), dtype=float)
    spacing = np.asarray(reference.GetSpacing(), dtype=float)
    return np.linalg.solve(direction, (points_mm - origin).T).T / spacing


def _read_mask_object(path: Path, modality: str) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise CaseError(SkipReason.MASK_UNREADABLE,
                        f"mask '{path}' is not readable DICOM: {exc}") from None
    if str(ds.get("Modality", "")) != modality:
        raise CaseError(SkipReason.MASK_UNREADABLE,
                        f"mask '{path}' is a DICOM {ds.get('Modality', '?')}, not {modality}")
    return ds


def _empty_like(reference: sitk.Image) -> np.ndarray:
    x, y, z = reference.GetSize()
    return np.zeros((z, y, x), dtype=np.uint8)


def _as_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def rtstruct_to_mask(rtstruct_path: Path, reference: sitk.Image, roi_name: str) -> sitk.Image:
    """Rasterize one RTSTRUCT ROI onto the reference grid (UInt8, 1 inside).

    Each closed planar contour is filled on its slice (voxel centres inside the polygon);
    contours on the same slice combine by XOR, so holes are holes.
    """
    ds = _read_mask_object(rtstruct_path, "RTSTRUCT")
    try:
        rois = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
        contours_by_roi = {int(c.ReferencedROINumber): c for c in ds.ROIContourSequence}
    except AttributeError as exc:
        raise CaseError(SkipReason.MASK_UNREADABLE,
                        f"RTSTRUCT '{rtstruct_path}' is incomplete: {exc}") from None
    matches = [n for n, name in rois.items() if name == roi_name]
    if not matches:
        matches = [n for n, name in rois.items() if name.lower() == roi_name.lower()]
    if not matches:
        raise CaseError(
            SkipReason.ROI_NOT_FOUND,
            f"RTSTRUCT '{rtstruct_path}' has no ROI '{roi_name}' "
            f"(ROIs: {', '.join(sorted(rois.values())) or 'none'})",
        )
    mask = _empty_like(reference)
    n_z, n_y, n_x = mask.shape
    roi_contours = contours_by_roi.get(matches[0])
    for contour in getattr(roi_contours, "ContourSequence", []) or []:
        if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
            continue
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        index = _physical_to_index(points, reference)
        k = int(round(float(np.mean(index[:, 2]))))
        if not 0 <= k < n_z:
            continue
        rows, cols = fill_polygon(index[:, 1], index[:, 0], shape=(n_y, n_x))
        mask[k, rows, cols] ^= 1
    return _as_image(mask, reference)


def seg_to_mask(seg_path: Path, reference: sitk.Image, segment: str | int | None = None
                ) -> sitk.Image:
    """Place one segment of a DICOM SEG on the reference grid (UInt8, 1 inside).

    ``segment`` is a SegmentLabel (case-insensitive) or SegmentNumber; None picks the only one.
    Frames are matched to reference slices by their ImagePositionPatient; the SEG must share
    the reference's in-plane grid.
    """
    import highdicom as hd

    _read_mask_object(seg_path, "SEG")
    try:
        seg = hd.seg.segread(str(seg_path))
    except Exception as exc:  # highdicom raises a variety of errors on malformed objects
        raise CaseError(SkipReason.MASK_UNREADABLE,
                        f"DICOM SEG '{seg_path}' cannot be read: {exc}") from None
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    if segment is None:
        if len(labels) != 1:
            raise CaseError(SkipReason.ROI_NOT_FOUND,
                            f"DICOM SEG '{seg_path}' has {len(labels)} segments "
                            f"({', '.join(labels.values())}); set the manifest's 'roi' column")
        number = next(iter(labels))
    else:
        text = str(segment)
        found = [n for n, name in labels.items() if name.lower() == text.lower()]
        if not found and text.isdigit() and int(text) in labels:
            found = [int(text)]
        if not found:
            raise CaseError(SkipReason.ROI_NOT_FOUND,
                            f"DICOM SEG '{seg_path}' has no segment '{segment}' "
                            f"(segments: {', '.join(labels.values())})")
        number = found[0]
    frames = np.asarray(seg.pixel_array)
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    if str(seg.SegmentationType) == "FRACTIONAL":
        frames = frames >= 0.5 * float(seg.MaximumFractionalValue)
    mask = _empty_like(reference)
    n_z, n_y, n_x = mask.shape
    if frames.shape[1:] != (n_y, n_x):
        raise CaseError(SkipReason.MASK_UNREADABLE,
                        f"DICOM SEG '{seg_path}' frames are {frames.shape[1:]}, the image slices "
                        f"{(n_y, n_x)}: a SEG on another grid is not supported")
    shared = seg.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        # A single-segment SEG may state its segment once, in the shared functional groups.
        ident = item.get("SegmentIdentificationSequence") or shared.get(
            "SegmentIdentificationSequence")
        if ident is not None and int(ident[0].ReferencedSegmentNumber) != number:
            continue
        plane = item.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
        if plane is None:
            raise CaseError(SkipReason.MASK_UNREADABLE,
                            f"DICOM SEG '{seg_path}' frame {i + 1} has no plane position")
        position = np.asarray(plane[0].ImagePositionPatient, dtype=float)
        x, y, z = _physical_to_index(position[np.newaxis], reference)[0]
        k = int(round(z))
        if abs(x) > 0.01 or abs(y) > 0.01 or abs(z - k) > 0.01 or not 0 <= k < n_z:
            raise CaseError(SkipReason.MASK_UNREADABLE,
                            f"DICOM SEG '{seg_path}' frame {i + 1} does not lie on an image slice")
        mask[k] |= frames[i].astype(bool)
    return _as_image(mask, reference)
