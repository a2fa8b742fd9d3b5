"""Federated image-level harmonization: the study's standard intensity scale (Nyul-Udupa
histogram standardization), split where the data lives.

**Histogram standardization** (Nyul, Udupa and Zhang, IEEE TMI 2000, as TorchIO's
``HistogramStandardization`` implements it). Each training image's intensity percentiles
(:data:`PERCENTILES`) inside the body are mapped linearly so that the first lands on 0 and the
last on ``scale``; the study's standard landmarks are their mean over every training image. A
site sends, per scanner, the count of its images and the sum of their mapped landmarks
(:func:`scanner_sums`); the server divides the totals (:func:`combine_image_sums`), which is
TorchIO's ``HistogramStandardization.train`` on the pooled images, exactly. Each site then maps
every image, training and test, piecewise linearly from its own landmarks onto the standard ones
(:mod:`client.standardize`), which undoes a monotone non-linear intensity response (a gamma) that
no per-feature location and scale can.

**Acquisition matching** (issue 15, step 2): scanners differ in resolution and noise, which
change texture features in ways no intensity mapping or per-feature location and scale undoes.
The same round carries, per scanner, the sum of its training images' voxel spacings (from the
header) and of their noise levels (:func:`noise_level`, in the landmarks' units). The server
takes as the study's target the coarsest mean spacing per axis and the highest mean noise among
the scanners, so that no image has to gain detail it never had; each site then smooths every
image to the target resolution and adds noise up to the target level
(:class:`client.standardize.MatchAcquisition`), as CT studies match noise power spectra.

The standard needs no label and nothing per scanner: each image is mapped by its own
landmarks. A scanner of fewer than the site's minimum of training images sends nothing (its
sums would be close to one patient's): the site names it, its images are mapped all the same,
and the multicentre report says it did not shape the standard. Nothing here does I/O or knows
about Flower; every array that leaves a site is indexed by scanner and landmark, never by
patient.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

import numpy as np
import numpy.typing as npt

from common.errors import HarmonizationError

FloatArray: TypeAlias = npt.NDArray[np.float64]
IntArray: TypeAlias = npt.NDArray[np.int64]

#: TorchIO's landmarks: the cut-offs (1st and 99th percentile), the quartiles and the deciles.
PERCENTILES = (1.0, 10.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 70.0, 75.0, 80.0, 90.0, 99.0)
#: The landmarks the piecewise-linear mapping runs through (TorchIO skips the 25th and 75th).
MAPPED = tuple(i for i, p in enumerate(PERCENTILES) if p not in (25.0, 75.0))
#: The axes of a voxel spacing, in the header's order.
AXES = ("x", "y", "z")
#: A Gaussian point-spread function's full width at half maximum over its sigma: a voxel of
#: spacing s is taken to resolve like a Gaussian of FWHM s.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: The fewest voxels a noise level is measured on.
MIN_NOISE_VOXELS = 200


def noise_level(image: npt.ArrayLike, body: npt.ArrayLike) -> float:
    """The SD of an image's white noise inside ``body`` (z-y-x arrays), from the residual of each
    voxel less the mean of its four in-plane neighbours over the voxels whose neighbours are all
    in the body (Immerkaer's residual in 2D, made robust: tissue edges and texture are a
    minority of the voxels, the steepest fifth is left out, a smooth bias field cancels). For
    white noise of SD sigma the residual's SD is sigma * sqrt(5/4)."""
    array = np.asarray(image, dtype=np.float64)
    inside = np.asarray(body, dtype=bool)
    if array.ndim != 3 or array.shape != inside.shape:
        raise HarmonizationError(f"noise level: an image of shape {array.shape} with a body mask "
                                 f"of shape {inside.shape}")
    core = inside[:, 1:-1, 1:-1] & inside[:, :-2, 1:-1] & inside[:, 2:, 1:-1] \
        & inside[:, 1:-1, :-2] & inside[:, 1:-1, 2:]
    residual = array[:, 1:-1, 1:-1] - 0.25 * (array[:, :-2, 1:-1] + array[:, 2:, 1:-1]
                                               + array[:, 1:-1, :-2] + array[:, 1:-1, 2:])
    # the central differences: for white noise independent of the residual (odd against even
    # weights), large at an edge, so the voxels of the steepest fifth are left out
    gradient = np.hypot(array[:, 2:, 1:-1] - array[:, :-2, 1:-1],
                        array[:, 1:-1, 2:] - array[:, 1:-1, :-2])[core]
    values = residual[core]
    if values.size:
        values = values[gradient <= np.percentile(gradient, 80.0)]
    if values.size < MIN_NOISE_VOXELS or not np.all(np.isfinite(values)):
        raise HarmonizationError(f"noise level: {values.size} finite voxels inside the body, "
                                 f"fewer than {MIN_NOISE_VOXELS}")
    # the lower quartile of the absolute deviations (a normal's is 0.3186 SD): edges and texture
    # move it less than the median
    quartile = float(np.percentile(np.abs(values - np.median(values)), 25.0))
    return quartile / 0.31863936396437514 / math.sqrt(1.25)


def smoothing_sigmas(spacing: Sequence[float], target: Sequence[float]) -> tuple[float, ...]:
    """The Gaussian sigma (mm, per axis) that brings an image of voxel ``spacing`` to the
    resolution of ``target`` spacing, each taken as a Gaussian of FWHM the spacing (0 on an axis
    already as coarse)."""
    return tuple(math.sqrt(max(0.0, t * t - s * s)) / FWHM_PER_SIGMA
                 for s, t in zip(spacing, target, strict=True))


def image_landmarks(values: npt.ArrayLike, scale: float) -> FloatArray:
    """One image's landmarks (the :data:`PERCENTILES` of ``values``, its body's intensities)
    mapped linearly so that the first lands on 0 and the last on ``scale``."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 2 or not np.all(np.isfinite(values)):
        raise HarmonizationError("histogram standardization needs finite intensities in the body")
    landmarks = np.percentile(values, PERCENTILES)
    spread = landmarks[-1] - landmarks[0]
    if not spread > 0:
        raise HarmonizationError("the body's intensities are constant between the 1st and 99th "
                                 "percentile: no histogram to standardize")
    out: FloatArray = (landmarks - landmarks[0]) * (scale / spread)
    return out


def standardize_histogram(image: npt.ArrayLike, body: npt.ArrayLike, standard: Sequence[float]
                          ) -> FloatArray:
    """Map ``image`` piecewise linearly from its own landmarks (inside ``body``) onto the
    ``standard`` ones (TorchIO's mapping: the outer segments extend beyond the 1st and 99th
    percentile)."""
    array = np.asarray(image, dtype=np.float64)
    inside = array[np.asarray(body, dtype=bool)]
    if inside.size < 2:
        raise HarmonizationError("histogram standardization: the body mask is empty")
    own = np.percentile(inside, PERCENTILES)[list(MAPPED)]
    target = np.asarray(standard, dtype=np.float64)[list(MAPPED)]
    step = np.diff(own)
    slope = np.diff(target) / np.where(step < 1e-5, np.inf, step)
    intercept = target[:-1] - slope * own[:-1]
    segment = np.digitize(array, own[1:-1], right=False)
    out: FloatArray = slope[segment] * array + intercept[segment]
    return out


@dataclass(frozen=True)
class ImageMeasure:
    """What the image harmonization round measures on one training image: its scanner, its
    mapped landmarks (:func:`image_landmarks`), its noise level in the same units
    (:func:`noise_level`) and its voxel spacing (mm, x-y-z). It stays at the site."""
    scanner: str
    landmarks: FloatArray
    noise: float
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class ImageSums:
    """What a site sends: per scanner, how many training images and the sums of their mapped
    landmarks (:data:`PERCENTILES`), noise levels and voxel spacings; and the scanners of 1 to
    ``min_patients - 1`` training images, named without their count (their images are still
    standardized; they do not shape the standard)."""
    scanners: tuple[str, ...]
    counts: IntArray           # (scanners,)
    landmarks: FloatArray      # (scanners, landmarks)
    noise: FloatArray          # (scanners,)
    spacing: FloatArray        # (scanners, axes)
    small: tuple[str, ...] = ()

    #: What may leave a site (:func:`common.records.check_sent`).
    AXES: ClassVar = {"scanners": ("scanners",), "counts": ("scanners",),
                      "landmarks": ("scanners", "landmarks"), "noise": ("scanners",),
                      "spacing": ("scanners", "axes"), "small": ("small",)}
    COUNTS: ClassVar = {"counts": "min_patients"}


def scanner_sums(images: Sequence[ImageMeasure], min_images: int) -> ImageSums:
    """A site's sums per scanner of its training images' measures; a scanner of fewer than
    ``min_images`` images is named apart, unsummed."""
    grouped: dict[str, list[ImageMeasure]] = {}
    for image in images:
        grouped.setdefault(str(image.scanner), []).append(image)
    kept = {s: rows for s, rows in sorted(grouped.items()) if len(rows) >= min_images}
    small = tuple(s for s in sorted(grouped) if s not in kept)
    if not kept:
        return ImageSums((), np.zeros(0, dtype=np.int64), np.zeros((0, len(PERCENTILES))),
                         np.zeros(0), np.zeros((0, len(AXES))), small)
    return ImageSums(
        tuple(kept), np.array([len(r) for r in kept.values()], dtype=np.int64),
        np.stack([np.sum([np.asarray(m.landmarks, dtype=np.float64) for m in r], axis=0)
                  for r in kept.values()]),
        np.array([math.fsum(m.noise for m in r) for r in kept.values()]),
        np.array([np.sum([m.spacing for m in r], axis=0) for r in kept.values()],
                 dtype=np.float64), small)


@dataclass(frozen=True)
class Acquisition:
    """One scanner's mean noise level (standard units) and voxel spacing (mm, x-y-z)."""
    noise: float
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class ImageStandard:
    """The study's standard landmarks, with what shaped them: per scanner, how many training
    images and their mean mapped landmarks; the scanners some site held too few images of
    (``left_out``: site -> scanners). With acquisition matching, the study's target noise level
    (``noise``, standard units) and resolution (``spacing``, mm x-y-z), each None where the
    protocol does not match it; ``acquisition``: per scanner, what the targets were taken from."""
    landmarks: tuple[float, ...]
    scale: float
    scanners: Mapping[str, tuple[int, tuple[float, ...]]] = field(default_factory=dict)
    left_out: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    noise: float | None = None
    spacing: tuple[float, float, float] | None = None
    acquisition: Mapping[str, Acquisition] = field(default_factory=dict)

    def shared(self) -> ImageStandard:
        """What every site standardizes with: the landmarks and the targets, not the other
        sites' scanners' figures."""
        return ImageStandard(self.landmarks, self.scale, noise=self.noise, spacing=self.spacing)

    def to_json(self) -> str:
        return json.dumps({"landmarks": list(self.landmarks), "scale": self.scale,
                           "scanners": {s: [n, list(m)] for s, (n, m) in
                                        sorted(self.scanners.items())},
                           "left_out": {s: list(v) for s, v in sorted(self.left_out.items())},
                           "noise": self.noise,
                           "spacing": None if self.spacing is None else list(self.spacing),
                           "acquisition": {s: {"noise": a.noise, "spacing": list(a.spacing)}
                                           for s, a in sorted(self.acquisition.items())}},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ImageStandard:
        try:
            data: dict[str, Any] = json.loads(text)
            landmarks = tuple(float(v) for v in data["landmarks"])
            if len(landmarks) != len(PERCENTILES) or not all(map(math.isfinite, landmarks)):
                raise ValueError(f"{len(landmarks)} landmarks, expected {len(PERCENTILES)} "
                                 "finite ones")
            noise = data.get("noise")
            spacing = data.get("spacing")
            if noise is not None and not (math.isfinite(float(noise)) and float(noise) >= 0):
                raise ValueError(f"a target noise level of {noise}")
            if spacing is not None and (len(spacing) != len(AXES) or not all(
                    math.isfinite(float(v)) and float(v) > 0 for v in spacing)):
                raise ValueError(f"a target spacing of {spacing}")
            return cls(landmarks, float(data["scale"]),
                       {str(s): (int(n), tuple(float(v) for v in m))
                        for s, (n, m) in data["scanners"].items()},
                       {str(s): tuple(str(v) for v in names)
                        for s, names in data["left_out"].items()},
                       None if noise is None else float(noise),
                       None if spacing is None else _spacing(spacing),
                       {str(s): Acquisition(float(a["noise"]), _spacing(a["spacing"]))
                        for s, a in data.get("acquisition", {}).items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HarmonizationError(f"image standard: not the server's JSON ({exc})") from None


def _spacing(values: Sequence[Any]) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in values)
    return x, y, z


def combine_image_sums(parts: Mapping[str, ImageSums], scale: float, match_noise: bool = False,
                       match_resolution: bool = False) -> ImageStandard:
    """The study's standard landmarks from every site's sums (site -> sums): the mean of every
    training image's mapped landmarks, TorchIO's ``HistogramStandardization.train`` on the
    pooled images. With ``match_noise`` / ``match_resolution``, the acquisition targets: the
    highest of the scanners' mean noise levels, the coarsest of their mean spacings per axis."""
    totals: dict[str, list[Any]] = {}
    for site, part in parts.items():
        n = len(part.scanners)
        if part.landmarks.shape != (n, len(PERCENTILES)) or part.counts.shape != (n,) or \
                part.noise.shape != (n,) or part.spacing.shape != (n, len(AXES)):
            raise HarmonizationError(f"site '{site}': image sums of shapes "
                                     f"{part.landmarks.shape}, {part.noise.shape} and "
                                     f"{part.spacing.shape} for {n} scanners")
        if not (np.all(np.isfinite(part.noise)) and np.all(part.noise >= 0)
                and np.all(np.isfinite(part.spacing)) and np.all(part.spacing > 0)):
            raise HarmonizationError(f"site '{site}': image sums with a negative or non-finite "
                                     "noise level or spacing")
        for scanner, count, landmarks, noise, spacing in zip(
                part.scanners, part.counts, part.landmarks, part.noise, part.spacing,
                strict=True):
            entry = totals.setdefault(scanner, [0, np.zeros(len(PERCENTILES)), 0.0,
                                                np.zeros(len(AXES))])
            entry[0] += int(count)
            entry[1] = entry[1] + landmarks
            entry[2] += float(noise)
            entry[3] = entry[3] + spacing
    count = sum(e[0] for e in totals.values())
    if not count:
        raise HarmonizationError("no scanner has enough training images to standardize")
    landmarks = np.sum([e[1] for e in totals.values()], axis=0) / count
    acquisition = {s: Acquisition(noise / n, _spacing(spacing / n))
                   for s, (n, _, noise, spacing) in sorted(totals.items())}
    return ImageStandard(
        tuple(float(v) for v in landmarks), scale,
        {s: (n, tuple(float(v) for v in total / n))
         for s, (n, total, _, _) in sorted(totals.items())},
        {site: part.small for site, part in sorted(parts.items()) if part.small},
        max(a.noise for a in acquisition.values()) if match_noise else None,
        _spacing(np.max([a.spacing for a in acquisition.values()], axis=0))
        if match_resolution else None,
        acquisition)
