"""Image standardization before feature extraction, the IBSI way.

Longer than 400 lines: every step and the order :func:`build_steps` runs them in read together.

Each step is a small callable: its ``__init__`` stores parameters, ``__call__`` maps a
:class:`Volume` to a new one, and :meth:`record` returns the parameters for provenance.
:func:`build_steps` turns the protocol's ``standardization`` section into the ordered list.

IBSI-1 (reference manual, image processing chapter) rules implemented here, where pyradiomics'
own preprocessing differs:

* resampling keeps the grid centres aligned (the new grid is centred on the old one; pyradiomics
  aligns the grid corners and crops to the mask);
* CT intensities are rounded to integers after interpolation;
* the mask is interpolated (linearly by default) and kept where the result is >= 0.5;
* re-segmentation (range, then outlier filtering) shrinks only the *intensity* mask; morphology
  uses the *morphological* mask, as IBSI defines.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from client.limits import MAX_CASE_VOXELS, Budget, check_voxels
from common.errors import CaseError, ConfigError, HarmonizationError, SkipReason
from common.protocol import (
    BiasCorrectionSpec,
    Modality,
    NormalizationSpec,
    ResampleSpec,
    StudyProtocol,
)
from harmonization.images import (
    PERCENTILES,
    ImageStandard,
    image_landmarks,
    noise_level,
    smoothing_sigmas,
    standardize_histogram,
)

_INTERPOLATORS = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,  # cubic B-spline: IBSI's "tricubic spline"
}


@dataclass(frozen=True)
class Volume:
    """One case's image and masks on a common grid.

    Attributes
    ----------
    image
        Intensities as float32 (HU for CT, SUV for PET, arbitrary or normalized units for MR).
    labels
        UInt8 label map: the ROI label and optionally a reference-tissue label.
    roi_label
        The label of the region of interest in ``labels``.
    intensity_roi
        UInt8 0/1 mask of the ROI after re-segmentation; ``None`` until a re-segmentation step
        ran (then the morphological ROI is used).
    """

    image: sitk.Image
    labels: sitk.Image
    roi_label: int
    intensity_roi: sitk.Image | None = None

    def morphological_roi(self) -> sitk.Image:
        """UInt8 0/1 mask of the ROI before re-segmentation (for shape features)."""
        return sitk.Cast(sitk.Equal(self.labels, self.roi_label), sitk.sitkUInt8)

    def roi_for_intensity(self) -> sitk.Image:
        return self.intensity_roi if self.intensity_roi is not None else self.morphological_roi()


def _array(image: sitk.Image) -> np.ndarray:
    # A copy, not GetArrayViewFromImage: a view of a temporary image dangles once it is freed.
    return sitk.GetArrayFromImage(image)


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(reference)
    return out


def ibsi_grid(
    image: sitk.Image, spacing_mm: tuple[float, float, float], in_plane_only: bool
) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    """The IBSI resampling grid: (size, origin, spacing) with grid centres aligned.

    For each axis, ``n_b = ceil(n_a * s_a / s_b)`` and the new origin moves by
    ``(s_a * (n_a - 1) - s_b * (n_b - 1)) / 2`` along that axis (in the image's direction frame),
    so that the centre of the new grid is the centre of the old one.
    """
    s_a = np.asarray(image.GetSpacing(), dtype=float)
    n_a = np.asarray(image.GetSize(), dtype=float)
    s_b = np.asarray(spacing_mm, dtype=float)
    if in_plane_only:
        s_b[2] = s_a[2]
    # Round before ceil: 100 * 0.5 / 0.5 must give 100, not 101 from a last-bit error.
    n_b = np.ceil(np.round(n_a * s_a / s_b, 6)).astype(int)
    shift = (s_a * (n_a - 1) - s_b * (n_b - 1)) / 2.0
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), dtype=float) + direction @ shift
    return tuple(int(n) for n in n_b), tuple(float(o) for o in origin), tuple(float(s) for s in s_b)


def _resample_to(
    image: sitk.Image,
    grid: tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]],
    interpolator: int,
) -> sitk.Image:
    size, origin, spacing = grid
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),
        interpolator,
        origin,
        spacing,
        image.GetDirection(),
        0.0,
        sitk.sitkFloat32,
        True,  # useNearestNeighborExtrapolator: the aligned grid may overhang the old one
    )


def crop_grid(
    grid: tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]],
    labels: sitk.Image,
    margin_voxels: int,
) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    """The part of ``grid`` that covers every labelled voxel plus ``margin_voxels``.

    The sub-grid keeps the grid's points (same spacing, origin moved by whole voxels), so
    resampling onto it gives exactly the values of the full grid there, for a fraction of the
    work; filters (LoG, wavelet) see ``margin_voxels`` of context around the ROI.
    """
    size, origin, spacing = grid
    present = np.argwhere(_array(labels) != 0)
    if present.size == 0:
        return grid
    lo_zyx, hi_zyx = present.min(axis=0), present.max(axis=0)
    corners = np.array([[x, y, z] for x in (lo_zyx[2] - 0.5, hi_zyx[2] + 0.5)
                        for y in (lo_zyx[1] - 0.5, hi_zyx[1] + 0.5)
                        for z in (lo_zyx[0] - 0.5, hi_zyx[0] + 0.5)])
    direction = np.asarray(labels.GetDirection(), dtype=float).reshape(3, 3)
    physical = np.asarray(labels.GetOrigin()) + (corners * labels.GetSpacing()) @ direction.T
    index = np.linalg.solve(direction, (physical - np.asarray(origin)).T).T / np.asarray(spacing)
    first = np.maximum(np.floor(index.min(axis=0)).astype(int) - margin_voxels, 0)
    last = np.minimum(np.ceil(index.max(axis=0)).astype(int) + margin_voxels,
                      np.asarray(size) - 1)
    new_origin = np.asarray(origin) + direction @ (first * np.asarray(spacing))
    return (tuple(int(n) for n in last - first + 1), tuple(float(o) for o in new_origin),
            spacing)


class Resample:
    """IBSI resampling of image and mask (grid centres aligned); CT rounded to integer HU.

    With ``margin_voxels`` set, only the part of the IBSI grid around the labelled voxels is
    computed (:func:`crop_grid`): the same values, far less work on large fields of view.
    """

    def __init__(self, spec: ResampleSpec, round_intensities: bool,
                 margin_voxels: int | None = None,
                 max_voxels: int | Budget = MAX_CASE_VOXELS) -> None:
        self.spec = spec
        self.round_intensities = round_intensities
        self.margin_voxels = margin_voxels
        self.max_voxels = max_voxels

    def __call__(self, volume: Volume) -> Volume:
        spec = self.spec
        grid = ibsi_grid(volume.image, spec.spacing_mm, spec.in_plane_only)
        if self.margin_voxels is not None:
            grid = crop_grid(grid, volume.labels, self.margin_voxels)
        check_voxels(grid[0], f"the grid resampled to {spec.spacing_mm} mm", self.max_voxels)
        image = _resample_to(volume.image, grid, _INTERPOLATORS[spec.interpolation])
        if self.round_intensities:
            image = _like(np.round(_array(image)).astype(np.float32), image)
        labels = self._resample_labels(volume.labels, grid, volume.roi_label)
        return Volume(image=image, labels=labels, roi_label=volume.roi_label)

    def _resample_labels(self, labels: sitk.Image, grid: Any, roi_label: int) -> sitk.Image:
        if self.spec.mask_interpolation == "nearest":
            return sitk.Resample(
                labels, grid[0], sitk.Transform(), sitk.sitkNearestNeighbor, grid[1], grid[2],
                labels.GetDirection(), 0, sitk.sitkUInt8,
            )
        # Linear: each label as its own partial-volume fraction, kept where >= threshold.
        values = [int(v) for v in np.unique(_array(labels)) if v != 0]
        result: np.ndarray | None = None
        # The first label written wins a voxel claimed by two labels: the ROI goes first.
        for value in sorted(values, key=lambda v: v != roi_label):
            fraction = _resample_to(
                sitk.Cast(sitk.Equal(labels, value), sitk.sitkFloat32), grid, sitk.sitkLinear
            )
            inside = _array(fraction) >= self.spec.mask_threshold - 1e-6
            if result is None:
                result = np.zeros(inside.shape, dtype=np.uint8)
            result[inside & (result == 0)] = value
        if result is None:
            size = grid[0]
            result = np.zeros((size[2], size[1], size[0]), dtype=np.uint8)
        reference = sitk.Image(grid[0], sitk.sitkUInt8)
        reference.SetOrigin(grid[1])
        reference.SetSpacing(grid[2])
        reference.SetDirection(labels.GetDirection())
        return _like(result, reference)

    def record(self) -> dict[str, Any]:
        return {"step": "resample", **self.spec.model_dump(mode="json"),
                "round_intensities": self.round_intensities,
                "crop_margin_voxels": self.margin_voxels}


class BiasFieldCorrection:
    """N4 bias-field correction (MRI), fitted on a shrunken image with an Otsu body mask,
    applied at full resolution. It runs on one thread: ITK's threads sum in their own order,
    so the result would depend on how many threads the site's workers leave each case (by
    default a site runs one case per core, each on one thread, anyway)."""

    def __init__(self, spec: BiasCorrectionSpec) -> None:
        self.spec = spec

    def __call__(self, volume: Volume) -> Volume:
        image = sitk.Cast(volume.image, sitk.sitkFloat32)
        array = _array(image)
        offset = float(array.min())
        if offset <= 0:  # N4 works on log intensities: needs strictly positive values
            image = image - offset + 1.0
        body = sitk.OtsuThreshold(image, 0, 1, 200)
        factor = [min(self.spec.shrink_factor, max(1, s // 8)) for s in image.GetSize()]
        small = sitk.Shrink(image, factor)
        small_mask = sitk.Shrink(body, factor)
        n4 = sitk.N4BiasFieldCorrectionImageFilter()
        n4.SetMaximumNumberOfIterations(list(self.spec.iterations))
        threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        try:
            n4.Execute(small, small_mask)
            log_bias = n4.GetLogBiasFieldAsImage(image)
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        corrected = image / sitk.Exp(log_bias)
        if offset <= 0:
            corrected = corrected + offset - 1.0
        return replace(volume, image=sitk.Cast(corrected, sitk.sitkFloat32))

    def record(self) -> dict[str, Any]:
        return {"step": "n4_bias_correction", **self.spec.model_dump(mode="json")}


class Normalize:
    """MRI intensity normalization (z-score, percentile or reference tissue)."""

    def __init__(self, spec: NormalizationSpec) -> None:
        self.spec = spec

    def __call__(self, volume: Volume) -> Volume:
        spec = self.spec
        values = _array(volume.image).astype(np.float64)
        if spec.method == "reference_tissue":
            assert spec.reference_label is not None  # guaranteed by NormalizationSpec
            tissue = values[_array(volume.labels) == spec.reference_label]
            if tissue.size == 0:
                raise CaseError(
                    SkipReason.STANDARDIZATION_FAILED,
                    f"reference tissue label {spec.reference_label} is absent from the mask",
                )
            reference = float(np.median(tissue))
            if reference <= 0:
                raise CaseError(
                    SkipReason.STANDARDIZATION_FAILED,
                    f"reference tissue (label {spec.reference_label}) median is {reference:g}: "
                    "cannot normalize by it",
                )
            out = values / reference * spec.scale
        else:
            body = _array(sitk.OtsuThreshold(volume.image, 0, 1, 200)).astype(bool)
            foreground = values[body] if body.any() else values.ravel()
            if spec.method == "zscore":
                sd = float(foreground.std())
                if sd == 0:
                    raise CaseError(SkipReason.STANDARDIZATION_FAILED, "image is constant")
                out = (values - foreground.mean()) / sd * spec.scale
            else:
                lo, hi = np.percentile(foreground, spec.percentiles)
                if hi <= lo:
                    raise CaseError(SkipReason.STANDARDIZATION_FAILED, "image is constant")
                out = (values - lo) / (hi - lo) * spec.scale
        return replace(volume, image=_like(out.astype(np.float32), volume.image))

    def record(self) -> dict[str, Any]:
        return {"step": "normalize", **self.spec.model_dump(mode="json")}


def body_mask(image: sitk.Image) -> np.ndarray:
    """The body on an MR image (bool, z-y-x): voxels above a tenth of the 99.5th percentile,
    opened by one voxel, the largest connected part, its holes filled slice by slice. (Otsu's
    threshold on a T1-weighted image splits fat and marrow from the other tissues, not the body
    from the air.)"""
    values = _array(image)
    inside = values > 0.1 * float(np.percentile(values, 99.5))
    inside = ndimage.binary_opening(inside, iterations=1)
    parts, count = ndimage.label(inside)
    if count > 1:
        sizes = ndimage.sum_labels(inside, parts, index=np.arange(1, count + 1))
        inside = parts == 1 + int(np.argmax(sizes))
    for k in range(inside.shape[0]):
        inside[k] = ndimage.binary_fill_holes(inside[k])
    return np.asarray(inside, dtype=bool)


def measure_image(volume: Volume, scale: float
                  ) -> tuple[np.ndarray, float, tuple[float, float, float]]:
    """What the image harmonization round measures on a case: its histogram landmarks inside
    its body mapped onto [0, ``scale``] (:func:`harmonization.images.image_landmarks`), its
    noise level in the same units (:func:`harmonization.images.noise_level`) and its voxel
    spacing (mm, x-y-z)."""
    values = _array(volume.image)
    body = body_mask(volume.image)
    try:
        landmarks = image_landmarks(values[body], scale)
        low, high = np.percentile(values[body], [PERCENTILES[0], PERCENTILES[-1]])
        noise = noise_level(values, body) * scale / float(high - low)
    except HarmonizationError as exc:
        raise CaseError(SkipReason.STANDARDIZATION_FAILED, str(exc)) from None
    x, y, z = (float(v) for v in volume.image.GetSpacing())
    return landmarks, noise, (x, y, z)


class HistogramStandardize:
    """Nyul-Udupa histogram standardization onto the study's standard landmarks (the federated
    image harmonization phase: :mod:`harmonization.images`)."""

    def __init__(self, standard: ImageStandard) -> None:
        self.standard = standard

    def __call__(self, volume: Volume) -> Volume:
        image = volume.image
        try:
            out = standardize_histogram(_array(image), body_mask(image), self.standard.landmarks)
        except HarmonizationError as exc:
            raise CaseError(SkipReason.STANDARDIZATION_FAILED, str(exc)) from None
        return replace(volume, image=_like(out.astype(np.float32), image))

    def record(self) -> dict[str, Any]:
        return {"step": "histogram_standardization", "scale": self.standard.scale,
                "landmarks": list(self.standard.landmarks)}


class MatchAcquisition:
    """Acquisition matching onto the study's targets (:mod:`harmonization.images`): a Gaussian
    that brings the image's resolution to the ``spacing`` target, then zero-mean Gaussian noise
    that brings its noise level (measured after the smoothing) up to the ``noise`` target. The
    noise is seeded by the image's own values, so a case always gets the same noise. An image
    already as coarse or as noisy is left so on that count."""

    def __init__(self, noise: float | None, spacing: tuple[float, float, float] | None) -> None:
        self.noise = noise
        self.spacing = spacing

    def __call__(self, volume: Volume) -> Volume:
        image = volume.image
        values = _array(image).astype(np.float64)
        if self.spacing is not None:
            sigmas = smoothing_sigmas(image.GetSpacing(), self.spacing)
            if any(s > 0 for s in sigmas):
                voxels = [s / d for s, d in zip(sigmas, image.GetSpacing(), strict=True)]
                values = ndimage.gaussian_filter(values, voxels[::-1], mode="nearest")
        if self.noise is not None:
            try:
                own = noise_level(values, body_mask(_like(values, image)))
            except HarmonizationError as exc:
                raise CaseError(SkipReason.STANDARDIZATION_FAILED, str(exc)) from None
            if own < self.noise:
                seed = int.from_bytes(hashlib.sha256(values.tobytes()).digest()[:8], "little")
                values = values + np.random.default_rng(seed).normal(
                    0.0, math.sqrt(self.noise ** 2 - own ** 2), values.shape)
        return replace(volume, image=_like(values.astype(np.float32), image))

    def record(self) -> dict[str, Any]:
        return {"step": "acquisition_matching", "noise": self.noise,
                "spacing_mm": None if self.spacing is None else list(self.spacing)}


class Resegment:
    """IBSI re-segmentation of the intensity mask: a range, then outlier filtering.

    The outlier bounds (mean +/- ``outlier_sigma`` SD) are computed on the ROI voxels left after
    the range step. The morphological mask is not changed.
    """

    def __init__(
        self, intensity_range: tuple[float, float] | None, outlier_sigma: float | None
    ) -> None:
        self.intensity_range = intensity_range
        self.outlier_sigma = outlier_sigma

    def __call__(self, volume: Volume) -> Volume:
        values = _array(volume.image)
        keep = _array(volume.roi_for_intensity()).astype(bool)
        if self.intensity_range is not None:
            low, high = self.intensity_range
            keep = keep & (values >= low) & (values <= high)
        if self.outlier_sigma is not None and keep.any():
            inside = values[keep].astype(np.float64)
            mean, sd = inside.mean(), inside.std()
            keep = keep & (np.abs(values - mean) <= self.outlier_sigma * sd)
        return replace(volume, intensity_roi=_like(keep.astype(np.uint8), volume.labels))

    def record(self) -> dict[str, Any]:
        rng = self.intensity_range
        return {
            "step": "resegment",
            "range": None if rng is None else [_json_float(v) for v in rng],
            "outlier_sigma": self.outlier_sigma,
        }


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def filter_margin_voxels(protocol: StudyProtocol) -> int:
    """Context kept around the ROI when resampling: 5 voxels (pyradiomics' own padding), or
    3 sigma of the widest LoG kernel if that is more. Derived from the protocol alone, so it is
    the same at every site."""
    spacing = min(protocol.standardization.resample.spacing_mm) if (
        protocol.standardization.resample is not None) else 1.0
    sigmas = protocol.radiomics.image_types.log_sigma_mm
    return max(5, math.ceil(3.0 * max(sigmas) / spacing) if sigmas else 0)


def intensity_steps(protocol: StudyProtocol) -> list[Any]:
    """The steps before histogram standardization (N4, normalization): what the image
    harmonization phase measures the landmarks after."""
    std = protocol.standardization
    steps: list[Any] = []
    if std.bias_correction is not None:
        steps.append(BiasFieldCorrection(std.bias_correction))
    if std.normalization is not None:
        steps.append(Normalize(std.normalization))
    return steps


def build_steps(protocol: StudyProtocol, max_voxels: int | Budget = MAX_CASE_VOXELS,
                standard: ImageStandard | None = None) -> list[Any]:
    """The protocol's standardization as an ordered list of steps; a resampled grid of more
    than ``max_voxels`` voxels is refused before it is allocated. A protocol with histogram
    standardization needs the study's ``standard`` (its image harmonization phase).

    PET SUV conversion happens when the DICOM series is read (it needs the DICOM header).
    """
    std = protocol.standardization
    steps = intensity_steps(protocol)
    if std.histogram is not None:
        if standard is None:
            raise ConfigError("study protocol", [
                "standardization.histogram: the study's standard landmarks are missing (the "
                "image harmonization phase makes them)"])
        if standard.scale != std.histogram.scale:
            raise ConfigError("study protocol", [
                f"standardization.histogram: the standard landmarks were made for scale "
                f"{standard.scale:g}, the protocol asks for {std.histogram.scale:g}"])
        steps.append(HistogramStandardize(standard))
        matching = std.matching
        if matching is not None:
            noise = standard.noise if matching.noise else None
            spacing = standard.spacing if matching.resolution else None
            if (matching.noise and noise is None) or (matching.resolution and spacing is None):
                raise ConfigError("study protocol", [
                    "standardization.matching: the study's standard carries no acquisition "
                    "target (the image harmonization phase makes them)"])
            steps.append(MatchAcquisition(noise, spacing))
    if std.resample is not None:
        steps.append(Resample(std.resample, round_intensities=protocol.modality is Modality.CT,
                              margin_voxels=filter_margin_voxels(protocol),
                              max_voxels=max_voxels))
    if std.resegmentation_range is not None or std.outlier_sigma is not None:
        steps.append(Resegment(std.resegmentation_range, std.outlier_sigma))
    return steps


def standardize(volume: Volume, steps: list[Any]) -> Volume:
    """Apply ``steps`` in order. A numerical failure becomes a :class:`CaseError`."""
    for step in steps:
        try:
            volume = step(volume)
        except CaseError:
            raise
        except (RuntimeError, ValueError) as exc:  # SimpleITK raises RuntimeError
            name = type(step).__name__
            raise CaseError(SkipReason.STANDARDIZATION_FAILED, f"{name}: {exc}") from None
    return volume
