"""A mask the segmentation network made, written as a DICOM SEG (highdicom) that references the
series it was drawn on, with the algorithm's identification: what a PACS and a reading
workstation show beside the images, and what ``myelofed`` reads back as a mask
(:func:`client.dicom.masks.seg_to_mask`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from client.dicom.series import list_series
from common.errors import CaseError, SkipReason

#: The algorithm's name in the SEG's AlgorithmIdentificationSequence.
ALGORITHM_NAME = "MyeloFed federated segmentation"


def _series_files(folder: Path, series_uid: str | None) -> list[Path]:
    series = list_series(folder)
    if series_uid is not None:
        if series_uid not in series:
            raise CaseError(SkipReason.SERIES_NOT_FOUND,
                            f"series {series_uid} is not in '{folder}'")
        return series[series_uid]
    if len(series) != 1:
        raise CaseError(SkipReason.SERIES_NOT_FOUND,
                        f"'{folder}' holds {len(series)} image series; name one (series_uid)")
    return next(iter(series.values()))


def write_seg(mask: sitk.Image, series_folder: Path, series_uid: str | None,
              segments: Sequence[tuple[int, str]], out_path: Path, version: str) -> None:
    """Write ``mask`` (a label map on the series' grid, as :func:`client.loading.read_image`
    reads the series) as a BINARY DICOM SEG of one segment per ``(label value, name)``,
    referencing every slice of the series, its algorithm AUTOMATIC and identified as
    :data:`ALGORITHM_NAME` ``version``. A slice that does not map onto one of the mask's
    planes is a :class:`CaseError` (``geometry_mismatch``)."""
    import highdicom as hd  # deferred: highdicom loads only to write or read a SEG

    files = _series_files(series_folder, series_uid)
    slices = [pydicom.dcmread(f) for f in files]
    labels = sitk.GetArrayViewFromImage(mask)
    planes = []
    for ds in slices:
        index = mask.TransformPhysicalPointToContinuousIndex(
            [float(v) for v in ds.ImagePositionPatient])
        k = int(round(index[2]))
        if abs(index[2] - k) > 0.01 or not 0 <= k < labels.shape[0] or max(
                abs(index[0]), abs(index[1])) > 0.01:
            raise CaseError(SkipReason.GEOMETRY_MISMATCH,
                            f"slice {ds.get('InstanceNumber', '?')} of '{series_folder}' is not a "
                            "plane of the mask's grid")
        planes.append(np.stack([labels[k] == value for value, _ in segments], axis=-1))
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, version=version, family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.BoneMarrow if number == 1 else codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        for number, (_, name) in enumerate(segments, start=1)]
    seg = hd.seg.Segmentation(
        source_images=slices, pixel_array=np.stack(planes).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=901,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="MyeloFed",
        manufacturer_model_name=ALGORITHM_NAME, software_versions=version,
        device_serial_number="0", series_description="MyeloFed automatic segmentation")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path)
