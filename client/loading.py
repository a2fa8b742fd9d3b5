"""Reading one case's image and mask from what a hospital has, and the per-case checks.

Images: a DICOM series folder (PET converted to SUV body weight from its tags) or a
NIfTI/NRRD/MHA file (PET files are taken to be in SUV already). Masks: a NIfTI/NRRD/MHA label
map, an RTSTRUCT (rasterized by ROI name) or a DICOM SEG, as a file or a folder holding one.
Every failure is a :class:`CaseError` naming the file and the reason.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from client.dicom.files import dicom_modality, is_dicom_file
from client.dicom.masks import check_references, rtstruct_to_mask, seg_to_mask
from client.dicom.series import read_dicom_series
from client.dicom.suv import suv_factor_body_weight
from client.limits import MAX_CASE_VOXELS, Budget, check_voxels
from client.manifest import CaseSpec
from client.standardize import Volume
from common.errors import CaseError, SkipReason
from common.protocol import IngestionSpec, Modality, StudyProtocol

#: NIfTI datatypes whose voxels can be NaN or infinite: float32, float64.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_scan(path: Path) -> tuple[str | None, np.ndarray | None]:
    """Why a NIfTI file is incomplete (or None), and which of its voxels are NaN or infinite
    (a flat boolean array in file order, or None when none is). ITK reads a truncated NIfTI
    without complaint (the missing voxels become zeros), so the file length is checked against
    its header; and it reads NaN and infinite voxels as 0, so they are found here."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            header = fh.read(540)
            layout = _nifti_layout(header)
            dtype = None
            if layout is not None and layout[3] in _NIFTI_FLOATS:
                dtype = np.dtype(layout[0] + _NIFTI_FLOATS[layout[3]])
            scan = _NonFinite(dtype, layout[2] if layout else 0, layout[1] if layout else 0)
            scan.feed(header)
            size = len(header)
            for block in iter(lambda: fh.read(1 << 20), b""):
                size += len(block)
                scan.feed(block)
    except (OSError, EOFError, zlib.error) as exc:
        return f"damaged compressed data ({exc})", None
    if len(header) < 348:
        return f"only {size} bytes: not a NIfTI file", None
    if layout is None:
        return "no NIfTI header", None
    _, voxels, offset, _, bitpix = layout
    expected = max(offset, 348) + voxels * max(bitpix, 8) // 8
    if size < expected:
        return f"truncated: {size} of {expected} bytes", None
    return None, scan.found


def _nifti_layout(header: bytes) -> tuple[str, int, int, int, int] | None:
    """(byte order, voxels, data offset, datatype, bits per voxel) from a NIfTI-1 or -2 header."""
    if len(header) < 348:
        return None
    for order in ("<", ">"):
        (sizeof_hdr,) = struct.unpack(order + "i", header[:4])
        if sizeof_hdr == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "hh", header[70:74])
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if sizeof_hdr == 540 and len(header) >= 540:
            dims = struct.unpack(order + "8q", header[16:80])
            datatype, bitpix = struct.unpack(order + "hh", header[12:16])
            (offset,) = struct.unpack(order + "q", header[168:176])
            break
    else:
        return None
    n_dims = max(0, min(int(dims[0]), 7))
    voxels = int(np.prod([max(1, int(d)) for d in dims[1: n_dims + 1]], dtype=object))
    return order, voxels, max(int(offset), 0), int(datatype), int(bitpix)


class _NonFinite:
    """Finds the NaN and infinite voxels of a NIfTI's float data as its bytes stream past."""

    def __init__(self, dtype: np.dtype | None, offset: int, voxels: int) -> None:
        self.dtype, self.offset, self.voxels = dtype, offset, voxels
        self.seen = 0  # bytes of the file so far
        self.carry = b""  # the start of a voxel split between two blocks
        self.index = 0  # voxels scanned
        self.found: np.ndarray | None = None

    def feed(self, block: bytes) -> None:
        start, self.seen = self.seen, self.seen + len(block)
        if self.dtype is None or self.seen <= self.offset:
            return
        data = self.carry + block[max(self.offset - start, 0):]
        whole = len(data) // self.dtype.itemsize * self.dtype.itemsize
        self.carry = data[whole:]
        values = np.frombuffer(data[:whole], dtype=self.dtype)[: self.voxels - self.index]
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            if self.found is None:
                self.found = np.zeros(self.voxels, dtype=bool)
            self.found[self.index + bad] = True
        self.index += len(values)


def _read_file(path: Path, what: str, reason: SkipReason,
               max_voxels: int | Budget = MAX_CASE_VOXELS) -> sitk.Image:
    def unreadable(problem: str) -> CaseError:
        return CaseError(reason, f"{what} '{path}' cannot be read: {problem}")

    def itk_reason(exc: RuntimeError) -> str:
        return str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()  # the header only
    except RuntimeError as exc:
        raise unreadable(itk_reason(exc)) from None
    check_voxels(reader.GetSize(), f"{what} '{path}'", max_voxels)
    non_finite = None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        problem, non_finite = _nifti_scan(path)
        if problem is not None:
            raise unreadable(problem)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise unreadable(itk_reason(exc)) from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(
            reason,
            f"{what} '{path}' is {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s); expected a 3D scalar volume",
        )
    if non_finite is not None and non_finite.size == int(np.prod(image.GetSize())):
        # ITK read them as 0: put them back as NaN (voxel order is the file's, x fastest)
        values = sitk.GetArrayFromImage(image).astype(np.float32)
        values.reshape(-1)[non_finite] = np.nan
        marked = sitk.GetImageFromArray(values)
        marked.CopyInformation(image)
        return marked
    return image


def read_image(case: CaseSpec, protocol: StudyProtocol,
               max_voxels: int | Budget = MAX_CASE_VOXELS
               ) -> sitk.Image:
    """The case's image as float32 (HU for CT, SUV for PET); one of more than ``max_voxels``
    voxels is refused from its header."""
    return _read_image(case, protocol, max_voxels)[0]


def _read_image(case: CaseSpec, protocol: StudyProtocol, max_voxels: int | Budget
                ) -> tuple[sitk.Image, pydicom.Dataset | None]:
    """:func:`read_image`, with the DICOM series' first header (None for a file)."""
    path = case.image
    if not path.exists():
        raise CaseError(SkipReason.FILE_MISSING, f"image '{path}' does not exist")
    if path.is_dir():
        image, header = read_dicom_series(path, case.series_uid, max_voxels)
        image = sitk.Cast(image, sitk.sitkFloat32)
        if protocol.modality is Modality.PET and protocol.standardization.suv:
            image = image * suv_factor_body_weight(header)
        return image, header
    if is_dicom_file(path):
        raise CaseError(
            SkipReason.IMAGE_UNREADABLE,
            f"image '{path}' is a single DICOM file; give the folder of the series instead",
        )
    return sitk.Cast(_read_file(path, "image", SkipReason.IMAGE_UNREADABLE, max_voxels),
                     sitk.sitkFloat32), None


def _find_dicom_mask(folder: Path) -> Path:
    candidates = [p for p in sorted(folder.iterdir()) if p.is_file() and is_dicom_file(p)]
    objects = [p for p in candidates if dicom_modality(p) in ("RTSTRUCT", "SEG")]
    if len(objects) != 1:
        raise CaseError(
            SkipReason.MASK_UNREADABLE,
            f"mask folder '{folder}' holds {len(objects)} RTSTRUCT/SEG files; expected exactly one",
        )
    return objects[0]


def read_mask(
    case: CaseSpec,
    image: sitk.Image,
    ingestion: IngestionSpec,
    reference: tuple[str, int] | None = None,
    image_header: pydicom.Dataset | None = None,
) -> sitk.Image:
    """The case's label map (UInt8) on the image grid.

    An RTSTRUCT or SEG mask gives the ROI as ``ingestion.roi_label``; with ``reference`` (ROI or
    segment name, label) it also gives the reference tissue for MR normalization as that label
    (the ROI wins where the two overlap). A label-map file carries its labels already. With
    the image's DICOM ``image_header``, an RTSTRUCT or SEG drawn on another patient, frame of
    reference or series is refused (``mask_mismatch``).
    """
    path = case.mask
    if path is None:
        raise CaseError(SkipReason.MISSING_FIELD, f"case '{case.case_id}' has no mask yet")
    if not path.exists():
        raise CaseError(SkipReason.FILE_MISSING, f"mask '{path}' does not exist")
    if path.is_dir():
        path = _find_dicom_mask(path)
    if is_dicom_file(path):
        kind = dicom_modality(path)
        if image_header is not None and kind in ("RTSTRUCT", "SEG"):
            check_references(path, image_header)
        roi = case.roi or ingestion.rtstruct_roi
        if kind == "RTSTRUCT":
            if roi is None:
                raise CaseError(
                    SkipReason.ROI_NOT_FOUND,
                    f"RTSTRUCT '{path}': no ROI name (set the protocol's ingestion.rtstruct_roi "
                    "or the manifest's 'roi' column)",
                )
            read = rtstruct_to_mask
        elif kind == "SEG":
            read = seg_to_mask
        else:
            raise CaseError(
                SkipReason.MASK_UNREADABLE,
                f"mask '{path}' is a DICOM {kind or 'file of unknown modality'}, "
                "not an RTSTRUCT or SEG",
            )
        labels = sitk.GetArrayFromImage(read(path, image, roi)).astype(np.uint8)
        labels *= ingestion.roi_label
        if reference is not None:
            name, value = reference
            tissue = sitk.GetArrayFromImage(read(path, image, name)) > 0
            labels[tissue & (labels == 0)] = value
        mask = sitk.GetImageFromArray(labels)
        mask.CopyInformation(image)
        return mask
    # the mask must match the image's grid: larger is refused before it is read
    mask = _read_file(path, "mask", SkipReason.MASK_UNREADABLE,
                      int(np.prod(image.GetSize(), dtype=np.int64)))
    check_geometry(image, mask, ingestion.geometry_tolerance, case.image, path)
    values = sitk.GetArrayViewFromImage(mask)
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.mod(values, 1) == 0):
        raise CaseError(
            SkipReason.MASK_UNREADABLE, f"mask '{path}' holds non-integer values: not a label map"
        )
    if values.min() < 0 or values.max() > 255:
        raise CaseError(
            SkipReason.MASK_UNREADABLE, f"mask '{path}' holds labels outside 0-255"
        )
    mask = sitk.Cast(mask, sitk.sitkUInt8)
    mask.CopyInformation(image)  # within tolerance: make it exact for the filters downstream
    return mask


def check_geometry(
    image: sitk.Image, mask: sitk.Image, tolerance: float, image_path: Path, mask_path: Path
) -> None:
    """Raise GEOMETRY_MISMATCH unless size agrees exactly and spacing, origin and direction agree
    within ``tolerance`` (spacing and origin as a fraction of the image's voxel spacing)."""
    problems = []
    if image.GetSize() != mask.GetSize():
        problems.append(f"size {mask.GetSize()} vs image {image.GetSize()}")
    spacing = np.asarray(image.GetSpacing())
    if np.any(np.abs(np.asarray(mask.GetSpacing()) - spacing) > tolerance * spacing):
        problems.append(f"spacing {mask.GetSpacing()} vs image {image.GetSpacing()}")
    if np.any(np.abs(np.asarray(mask.GetOrigin()) - image.GetOrigin()) > tolerance * spacing.min()):
        problems.append(f"origin {mask.GetOrigin()} vs image {image.GetOrigin()}")
    if np.any(np.abs(np.asarray(mask.GetDirection()) - image.GetDirection()) > tolerance):
        problems.append("direction differs")
    if problems:
        raise CaseError(
            SkipReason.GEOMETRY_MISMATCH,
            f"mask '{mask_path}' does not match image '{image_path}': " + "; ".join(problems),
        )


def check_roi(labels: sitk.Image, ingestion: IngestionSpec, where: str) -> int:
    """Return the ROI voxel count, or raise EMPTY_MASK / MASK_TOO_SMALL."""
    count = int(np.count_nonzero(sitk.GetArrayViewFromImage(labels) == ingestion.roi_label))
    if count == 0:
        raise CaseError(
            SkipReason.EMPTY_MASK, f"{where}: no voxel has the ROI label {ingestion.roi_label}"
        )
    if count < ingestion.min_roi_voxels:
        raise CaseError(
            SkipReason.MASK_TOO_SMALL,
            f"{where}: ROI has {count} voxels, fewer than min_roi_voxels = "
            f"{ingestion.min_roi_voxels}",
        )
    return count


def _finite(image: sitk.Image, labels: sitk.Image, policy: str, what: str
            ) -> tuple[sitk.Image, sitk.Image]:
    """The image and labels unchanged when every voxel is finite; otherwise the case is skipped
    (``policy`` "skip") or the non-finite voxels leave every label and take the image's median
    ("mask"): read as numbers, a NaN or inf would corrupt every statistic of the case."""
    values = sitk.GetArrayViewFromImage(image)
    bad = ~np.isfinite(values)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return image, labels
    inside = int((bad & (sitk.GetArrayViewFromImage(labels) != 0)).sum())
    if policy == "skip" or n_bad == bad.size:
        raise CaseError(SkipReason.NON_FINITE_VOXELS,
                        f"{what} holds {n_bad:,} NaN or infinite voxel(s), {inside:,} of them "
                        "labelled" + ("" if n_bad == bad.size else
                                      ": set ingestion.non_finite = 'mask' to leave them out"))
    fixed = np.where(bad, np.median(values[~bad]), values).astype(np.float32)
    kept = np.where(bad, 0, sitk.GetArrayViewFromImage(labels)).astype(np.uint8)
    out_image, out_labels = sitk.GetImageFromArray(fixed), sitk.GetImageFromArray(kept)
    out_image.CopyInformation(image)
    out_labels.CopyInformation(labels)
    return out_image, out_labels


def load_case(case: CaseSpec, protocol: StudyProtocol,
              max_voxels: int | Budget = MAX_CASE_VOXELS
              ) -> Volume:
    """Read and check one case: the volume on its native grid, ready for standardization (an
    image of more than ``max_voxels`` voxels is refused from its header)."""
    image, header = _read_image(case, protocol, max_voxels)
    norm = protocol.standardization.normalization
    reference = None
    if norm is not None and norm.reference_roi is not None and norm.reference_label is not None:
        reference = (norm.reference_roi, norm.reference_label)
    labels = read_mask(case, image, protocol.ingestion, reference, header)
    image, labels = _finite(image, labels, protocol.ingestion.non_finite, f"image '{case.image}'")
    check_roi(labels, protocol.ingestion, f"mask '{case.mask}'")
    if (norm is not None and norm.method == "reference_tissue" and norm.reference_label
            is not None and not (sitk.GetArrayViewFromImage(labels) == norm.reference_label).any()):
        # found here, so that `site check` finds every case extraction will refuse
        raise CaseError(SkipReason.ROI_NOT_FOUND,
                        f"mask '{case.mask}': the reference tissue (label {norm.reference_label}"
                        + (f", '{norm.reference_roi}'" if norm.reference_roi else "")
                        + ") that MR normalization divides by is absent")
    return Volume(image=image, labels=labels, roi_label=protocol.ingestion.roi_label)
