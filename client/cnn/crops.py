"""The CNN's crops (phase 5): what the network sees of each case, made and cached at the site.

The crop
    One channel, array layout ``(z, y, x)`` (SimpleITK's array order) of shape
    ``crop_size[::-1]``: :attr:`CnnSpec.crop_size` is ``(x, y, z)`` in voxels, like the
    protocol's ``spacing_mm``. The crop is a box centred on the bounding box of the ROI
    (``ingestion.roi_label``) of the IBSI-standardized volume, padded by :data:`CROP_MARGIN_MM`
    on each side and resampled (linear) so that the box fills the crop: the same in-plane spacing
    along x and y (the ROI keeps its axial shape), its own spacing along z. Intensities are
    z-scored with the mean and SD of the (re-segmented) ROI voxels, clipped to
    +/- :data:`CLIP_SD`, and set to 0 (the ROI mean) farther than :data:`ROI_DILATION_MM` outside
    the ROI: the network sees the marrow, not the fat, muscle or air, whose scanner-dependent
    signal would otherwise dominate. Tensors are ``(batch, 1, z, y, x)``.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from client.loading import load_case
from client.manifest import CaseSpec
from client.pipeline import case_cache_key, features_cache_path
from client.segment.masks import study_manifest
from client.standardize import Volume, build_steps, standardize
from client.volumes import load_volume, volume_path
from client.workspace import PREPARED_FILE, load_image_standard, load_study_table, study_dir
from common.errors import CaseError, ConfigError, SkipReason
from common.protocol import CnnSpec, StudyProtocol
from common.provenance import atomic_write_npz, software_versions
from common.site_config import SiteConfig
from harmonization.images import ImageStandard

log = logging.getLogger("myelofed.site")

CROP_SCHEMA_VERSION = 1
CROP_FILE = "crops.npz"
#: Context kept around the ROI's bounding box, each side, mm.
CROP_MARGIN_MM = 4.0
#: Voxels farther than this outside the ROI are set to 0 (the ROI mean), mm.
ROI_DILATION_MM = 2.0
#: z-scored intensities are clipped to +/- this many ROI standard deviations.
CLIP_SD = 5.0


def cnn_spec(protocol: StudyProtocol) -> CnnSpec:
    """The protocol's ``cnn`` section; a :class:`ConfigError` when the study has none."""
    if protocol.cnn is None:
        raise ConfigError("study protocol", ["has no 'cnn' section: the CNN phase is not part "
                                             "of this study"])
    return protocol.cnn


@dataclass(frozen=True)
class CropSet:
    """A site's crops, kept at the site.

    Attributes
    ----------
    crops
        float32, (n_cases, z, y, x): see the module docstring for what a crop holds.
    case_ids, splits
        Per crop: the case and its split (``"train"`` or ``"test"``) from the prepared table.
    labels
        float64, (n_cases,): 0/1 for classification, label units for regression.
    skipped
        Case id -> reason, for prepared cases whose crop could not be made.
    cached
        Whether this set was read from the site's cache rather than computed.
    """

    crops: np.ndarray
    case_ids: tuple[str, ...]
    splits: tuple[str, ...]
    labels: np.ndarray
    skipped: dict[str, str]
    cached: bool = False

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Crops (n, z, y, x) and labels (n,) of one split."""
        keep = np.array([s == name for s in self.splits], dtype=bool)
        return self.crops[keep], self.labels[keep]


def crop_path(site: SiteConfig, protocol: StudyProtocol) -> Path:
    """Where the site keeps its crops for this study (never sent)."""
    return study_dir(site, protocol) / "cnn" / CROP_FILE


def _crop_key(prepared: Path, protocol: StudyProtocol) -> str:
    """Content key of the crops: the prepared table's bytes, the crop rules, the crop size and
    the rest of the protocol (ingestion, standardization, task), but not the CNN's training
    settings, which do not change a crop."""
    h = hashlib.sha256()
    h.update(repr((CROP_SCHEMA_VERSION, cnn_spec(protocol).crop_size, CROP_MARGIN_MM,
                   ROI_DILATION_MM, CLIP_SD,
                   protocol.model_copy(update={"cnn": None}).content_hash())).encode())
    h.update(prepared.read_bytes())
    return h.hexdigest()


def crop_volume(image: sitk.Image, roi: sitk.Image, intensity_roi: sitk.Image,
                crop_size: tuple[int, int, int]) -> np.ndarray:
    """One case's crop, float32 (z, y, x), from a standardized image and its ROI masks.

    Parameters
    ----------
    image
        Intensities on the standardized grid.
    roi, intensity_roi
        UInt8 0/1 masks on the same grid: the morphological ROI (where the crop is centred and
        what is kept) and the re-segmented one (whose voxels give the mean and SD).
    crop_size
        (x, y, z), voxels.
    """
    where = np.argwhere(sitk.GetArrayViewFromImage(roi) > 0)
    if where.size == 0:
        raise CaseError(SkipReason.EMPTY_MASK, "no ROI voxel to centre the crop on")
    lo, hi = where.min(axis=0)[::-1], where.max(axis=0)[::-1]  # x, y, z indices
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    n = np.asarray(crop_size, dtype=float)
    extent = (hi - lo + 1) * spacing + 2 * CROP_MARGIN_MM  # mm, x y z
    in_plane = max(extent[0] / n[0], extent[1] / n[1])
    new_spacing = np.array([in_plane, in_plane, extent[2] / n[2]])
    centre = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in (lo + hi) / 2.0])
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.asarray(centre) - direction @ ((n - 1) / 2.0 * new_spacing)

    def resample(item: sitk.Image) -> np.ndarray:
        out = sitk.Resample(sitk.Cast(item, sitk.sitkFloat32), [int(v) for v in crop_size],
                            sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                            new_spacing.tolist(), image.GetDirection(), 0.0, sitk.sitkFloat32,
                            True)  # nearest extrapolation: the box may overhang the grid
        return sitk.GetArrayFromImage(out)

    values = resample(image)
    inside = resample(roi) >= 0.5
    stats = resample(intensity_roi) >= 0.5
    if not stats.any():
        stats = inside
    if not stats.any():
        raise CaseError(SkipReason.MASK_TOO_SMALL, "the ROI vanishes at the crop's resolution")
    mean, sd = float(values[stats].mean()), float(values[stats].std())
    if not sd > 0:
        raise CaseError(SkipReason.STANDARDIZATION_FAILED, "the ROI is constant in the crop")
    radius = [int(round(ROI_DILATION_MM / s)) for s in new_spacing]  # x, y, z voxels
    kept = inside
    if any(radius):
        dilated = sitk.BinaryDilate(sitk.GetImageFromArray(inside.astype(np.uint8)), radius)
        kept = sitk.GetArrayFromImage(dilated) > 0
    z = np.clip((values - mean) / sd, -CLIP_SD, CLIP_SD)
    return np.where(kept, z, 0.0).astype(np.float32)


#: One case's crop to make: the case, the protocol, the crop size, the study's image standard
#: and the site's cache folder.
CropJob = tuple[CaseSpec, StudyProtocol, tuple[int, int, int], ImageStandard | None, Path | None]


def standardized_volume(case: CaseSpec, protocol: StudyProtocol, standard: ImageStandard | None,
                        cache_dir: Path | None) -> Volume:
    """The case standardized as for radiomics: the volume its extraction kept
    (:mod:`client.volumes`) when there is one, else loaded and standardized again."""
    if cache_dir is not None:
        protocol_hash = protocol.content_hash()
        key = case_cache_key(case, protocol_hash, software_versions(), standard)
        kept = load_volume(volume_path(features_cache_path(cache_dir, protocol_hash, key)),
                           case.case_id)
        if kept is not None:
            return kept
    return standardize(load_case(case, protocol), build_steps(protocol, standard=standard))


def _crop_case(job: CropJob) -> tuple[str, np.ndarray | None, str]:
    """(case id, crop or None, reason): one case loaded, standardized and cropped."""
    case, protocol, crop_size, standard, cache_dir = job
    try:
        volume = standardized_volume(case, protocol, standard, cache_dir)
        crop = crop_volume(volume.image, volume.morphological_roi(),
                           volume.roi_for_intensity(), crop_size)
        return case.case_id, crop, ""
    except CaseError as exc:
        return case.case_id, None, f"{exc.reason.value}: {exc.detail}"
    except Exception as exc:  # a bug or an unforeseen file: skip the case, keep the others
        return case.case_id, None, f"{SkipReason.INTERNAL_ERROR.value}: {type(exc).__name__}: {exc}"


def _init_crop_worker() -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _crop_all(jobs: list[CropJob], workers: int) -> list[tuple[str, np.ndarray | None, str]]:
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        return [_crop_case(job) for job in jobs]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_crop_worker) as pool:
        return list(pool.map(_crop_case, jobs))


def prepare_crops(site: SiteConfig, protocol: StudyProtocol) -> CropSet:
    """This site's crops of every case in its prepared table (phase 2), from the cache when the
    prepared table has not changed since they were made.

    Cases are standardized as for radiomics (:func:`standardized_volume`: the volume the
    extraction kept, else loaded and standardized again) and cropped (:func:`crop_volume`) in
    ``site.n_workers`` processes. A case that fails is skipped,
    its reason logged here and kept in :attr:`CropSet.skipped`; the others go on. The cache
    (``<study dir>/cnn/crops.npz``, NPZ with a schema version, written atomically) is keyed on the
    prepared table's bytes: a new preparation makes new crops.
    """
    spec = cnn_spec(protocol)
    prepared = study_dir(site, protocol) / PREPARED_FILE
    table = load_study_table(site, protocol, PREPARED_FILE)
    key = _crop_key(prepared, protocol)
    path = crop_path(site, protocol)
    cached = _read_crops(path, key)
    if cached is not None:
        return cached

    cases, _ = study_manifest(site, protocol)
    by_id = {case.case_id: case for case in cases}
    standard = load_image_standard(site, protocol)
    label_column = protocol.task.label_column
    skipped: dict[str, str] = {}
    jobs, rows = [], []
    for case_id, split, label in zip(table["case_id"].astype(str), table["split"].astype(str),
                                     table[label_column].astype(float), strict=True):
        if case_id not in by_id:
            skipped[case_id] = "not_in_manifest: the manifest no longer lists this case"
            continue
        jobs.append((by_id[case_id], protocol, spec.crop_size, standard, site.cache_dir))
        rows.append((split, label))
    crops, kept = [], []
    for (case_id, crop, reason), row in zip(_crop_all(jobs, site.n_workers), rows, strict=True):
        if crop is None:
            skipped[case_id] = reason
        else:
            crops.append(crop)
            kept.append((case_id, *row))
    for case_id, reason in skipped.items():
        log.warning("CNN crop of case '%s' skipped: %s", case_id, reason)
    x, y, z = spec.crop_size
    result = CropSet(
        crops=np.stack(crops) if crops else np.zeros((0, z, y, x), np.float32),
        case_ids=tuple(k[0] for k in kept), splits=tuple(k[1] for k in kept),
        labels=np.array([k[2] for k in kept], dtype=np.float64), skipped=skipped)
    atomic_write_npz(path, {
        "schema_version": np.array(CROP_SCHEMA_VERSION), "key": np.array(key),
        "crops": result.crops, "case_ids": np.array(result.case_ids, dtype=str),
        "splits": np.array(result.splits, dtype=str), "labels": result.labels,
        "skipped_ids": np.array(list(skipped), dtype=str),
        "skipped_reasons": np.array(list(skipped.values()), dtype=str)})
    return result


def _read_crops(path: Path, key: str) -> CropSet | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if int(npz["schema_version"]) != CROP_SCHEMA_VERSION or str(npz["key"]) != key:
                return None
            return CropSet(crops=npz["crops"], case_ids=tuple(npz["case_ids"].tolist()),
                           splits=tuple(npz["splits"].tolist()), labels=npz["labels"],
                           skipped=dict(zip(npz["skipped_ids"].tolist(),
                                            npz["skipped_reasons"].tolist(), strict=True)),
                           cached=True)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # absent or damaged: recompute
