"""The standardized volumes the extraction made, kept at the site for the CNN's crops.

Standardization (N4 above all) is the costly part of a case; the extraction runs it, and the CNN
(:mod:`client.cnn.crops`) needs the very same volume. The extraction writes it beside the case's
cached features, under the same content key (:func:`client.pipeline.case_cache_key`: protocol,
the study's standard landmarks, software, ROI and file bytes), as one compressed NPZ with a
schema version, written atomically. A volume larger than :data:`MAX_CACHED_VOXELS` is not kept
(the resampled volume is cropped to the ROI and its margin, so this is a protocol without
resampling); a missing, damaged or foreign file reads as absent and the case is standardized
again. Like the features, the volumes never leave the site.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from client.standardize import Volume
from common.provenance import atomic_write_npz

VOLUME_SCHEMA_VERSION = 1
#: A standardized volume of more voxels than this is not kept (about 20 MB as float32 + masks).
MAX_CACHED_VOXELS = 4_000_000


def volume_path(features_path: Path) -> Path:
    """Where the volume of the case whose features are cached at ``features_path`` lives."""
    return features_path.with_suffix(".volume.npz")


def _geometry(image: sitk.Image) -> np.ndarray:
    return np.concatenate([image.GetOrigin(), image.GetSpacing(), image.GetDirection()])


def _image(array: np.ndarray, geometry: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(geometry[0:3].tolist())
    image.SetSpacing(geometry[3:6].tolist())
    image.SetDirection(geometry[6:15].tolist())
    return image


def save_volume(path: Path, volume: Volume, case_id: str) -> bool:
    """Keep ``volume`` at ``path``; False (nothing written) when it is too large to keep."""
    if volume.image.GetNumberOfPixels() > MAX_CACHED_VOXELS:
        return False
    arrays = {"image": sitk.GetArrayFromImage(volume.image).astype(np.float32),
              "labels": sitk.GetArrayFromImage(volume.labels).astype(np.uint8),
              "geometry": _geometry(volume.image),
              "meta": np.array([VOLUME_SCHEMA_VERSION, volume.roi_label]),
              "case_id": np.array(case_id)}
    if volume.intensity_roi is not None:
        arrays["intensity_roi"] = sitk.GetArrayFromImage(volume.intensity_roi).astype(np.uint8)
    atomic_write_npz(path, arrays, compressed=True)
    return True


def load_volume(path: Path, case_id: str) -> Volume | None:
    """The volume kept at ``path`` for ``case_id``; None when absent, damaged or not this
    case's (the caller standardizes the case again)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if (int(data["meta"][0]) != VOLUME_SCHEMA_VERSION
                    or str(data["case_id"]) != case_id):
                return None
            geometry = data["geometry"]
            image, labels = data["image"], data["labels"]
            if (geometry.shape != (15,) or image.shape != labels.shape or image.ndim != 3
                    or not np.isfinite(image).all()):
                return None
            intensity = data["intensity_roi"] if "intensity_roi" in data.files else None
            if intensity is not None and intensity.shape != image.shape:
                return None
            return Volume(_image(image, geometry), _image(labels, geometry),
                          int(data["meta"][1]),
                          None if intensity is None else _image(intensity, geometry))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
