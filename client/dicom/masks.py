"""Masks from DICOM objects: an RTSTRUCT ROI or a DICOM SEG segment on a reference grid.

Both give a ``sitkUInt8`` {0, 1} image with the reference image's geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from client.dicom.files import RTSTRUCT_SOP_CLASS, dicom_modality, short_reason
from common.errors import CaseError, SkipReason

__all__ = ["rtstruct_to_mask", "seg_to_mask"]

#: How far (in voxels) a SEG frame position may lie from a reference voxel centre.
_SEG_POSITION_TOLERANCE = 0.1


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


def _referenced(ds: pydicom.Dataset) -> dict[str, set[str]]:
    """What an RTSTRUCT or SEG says it was drawn on: its patient, frames of reference and
    image series (empty where it does not say)."""
    out: dict[str, set[str]] = {"patient": set(), "frame of reference": set(), "series": set()}

    def add(key: str, value: object) -> None:
        if value is not None and str(value).strip():
            out[key].add(str(value).strip())

    add("patient", ds.get("PatientID"))
    add("frame of reference", ds.get("FrameOfReferenceUID"))
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):  # RTSTRUCT
        add("frame of reference", frame.get("FrameOfReferenceUID"))
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                add("series", series.get("SeriesInstanceUID"))
    for series in ds.get("ReferencedSeriesSequence", []):  # SEG
        add("series", series.get("SeriesInstanceUID"))
    return out


def check_references(mask_path: Path, image_header: pydicom.Dataset) -> None:
    """Refuse (``mask_mismatch``) an RTSTRUCT or SEG drawn on another patient, frame of
    reference or series than the image's, where both say which: drawn elsewhere, its contours
    would only show up as an empty or wrong mask."""
    try:
        ds = pydicom.dcmread(mask_path, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:
        raise CaseError(SkipReason.MASK_UNREADABLE, f"mask '{mask_path}': {exc}") from None
    image = {"patient": image_header.get("PatientID"),
             "frame of reference": image_header.get("FrameOfReferenceUID"),
             "series": image_header.get("SeriesInstanceUID")}
    for key, values in _referenced(ds).items():
        mine = str(image[key]).strip() if image[key] is not None else ""
        if mine and values and mine not in values:
            raise CaseError(SkipReason.MASK_MISMATCH,
                            f"mask '{mask_path}' refers to {key} {', '.join(sorted(values))}; "
                            f"the image is of {key} {mine}")


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
            SkipReason.MASK_UNREADABLE, f"RTSTRUCT '{path}' cannot be read: {short_reason(exc)}"
        ) from None
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality != "RTSTRUCT" and str(ds.get("SOPClassUID", "")) != RTSTRUCT_SOP_CLASS:
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
                f"ContourData ({short_reason(exc)})",
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
            SkipReason.MASK_UNREADABLE, f"SEG '{path}' cannot be read: {short_reason(exc)}"
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
            SkipReason.MASK_UNREADABLE, f"{where}: frames cannot be decoded: {short_reason(exc)}"
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
