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
class ImageSums:
    """What a site sends: per scanner, how many training images and the sum of their mapped
    landmarks (:data:`PERCENTILES`); and the scanners of 1 to ``min_patients - 1`` training
    images, named without their count (their images are still standardized; they do not shape
    the standard)."""
    scanners: tuple[str, ...]
    counts: IntArray           # (scanners,)
    landmarks: FloatArray      # (scanners, landmarks)
    small: tuple[str, ...] = ()

    #: What may leave a site (:func:`common.records.check_sent`).
    AXES: ClassVar = {"scanners": ("scanners",), "counts": ("scanners",),
                      "landmarks": ("scanners", "landmarks"), "small": ("small",)}
    COUNTS: ClassVar = {"counts": "min_patients"}


def scanner_sums(images: Sequence[tuple[str, FloatArray]], min_images: int) -> ImageSums:
    """A site's sums per scanner of its training images' mapped landmarks ``(scanner,
    landmarks)``; a scanner of fewer than ``min_images`` images is named apart, unsummed."""
    grouped: dict[str, list[FloatArray]] = {}
    for scanner, landmarks in images:
        grouped.setdefault(str(scanner), []).append(np.asarray(landmarks, dtype=np.float64))
    kept = {s: rows for s, rows in sorted(grouped.items()) if len(rows) >= min_images}
    small = tuple(s for s in sorted(grouped) if s not in kept)
    if not kept:
        return ImageSums((), np.zeros(0, dtype=np.int64), np.zeros((0, len(PERCENTILES))), small)
    return ImageSums(tuple(kept), np.array([len(r) for r in kept.values()], dtype=np.int64),
                     np.stack([np.sum(r, axis=0) for r in kept.values()]), small)


@dataclass(frozen=True)
class ImageStandard:
    """The study's standard landmarks, with what shaped them: per scanner, how many training
    images and their mean mapped landmarks; the scanners some site held too few images of
    (``left_out``: site -> scanners)."""
    landmarks: tuple[float, ...]
    scale: float
    scanners: Mapping[str, tuple[int, tuple[float, ...]]] = field(default_factory=dict)
    left_out: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"landmarks": list(self.landmarks), "scale": self.scale,
                           "scanners": {s: [n, list(m)] for s, (n, m) in
                                        sorted(self.scanners.items())},
                           "left_out": {s: list(v) for s, v in sorted(self.left_out.items())}},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ImageStandard:
        try:
            data: dict[str, Any] = json.loads(text)
            landmarks = tuple(float(v) for v in data["landmarks"])
            if len(landmarks) != len(PERCENTILES) or not all(map(math.isfinite, landmarks)):
                raise ValueError(f"{len(landmarks)} landmarks, expected {len(PERCENTILES)} "
                                 "finite ones")
            return cls(landmarks, float(data["scale"]),
                       {str(s): (int(n), tuple(float(v) for v in m))
                        for s, (n, m) in data["scanners"].items()},
                       {str(s): tuple(str(v) for v in names)
                        for s, names in data["left_out"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HarmonizationError(f"image standard: not the server's JSON ({exc})") from None


def combine_image_sums(parts: Mapping[str, ImageSums], scale: float) -> ImageStandard:
    """The study's standard landmarks from every site's sums (site -> sums): the mean of every
    training image's mapped landmarks, TorchIO's ``HistogramStandardization.train`` on the
    pooled images."""
    totals: dict[str, list[Any]] = {}
    for site, part in parts.items():
        if part.landmarks.shape != (len(part.scanners), len(PERCENTILES)) or \
                part.counts.shape != (len(part.scanners),):
            raise HarmonizationError(f"site '{site}': image sums of shape "
                                     f"{part.landmarks.shape} for {len(part.scanners)} scanners")
        for scanner, count, landmarks in zip(part.scanners, part.counts, part.landmarks,
                                             strict=True):
            entry = totals.setdefault(scanner, [0, np.zeros(len(PERCENTILES))])
            entry[0] += int(count)
            entry[1] = entry[1] + landmarks
    count = sum(e[0] for e in totals.values())
    if not count:
        raise HarmonizationError("no scanner has enough training images to standardize")
    landmarks = np.sum([e[1] for e in totals.values()], axis=0) / count
    return ImageStandard(
        tuple(float(v) for v in landmarks), scale,
        {s: (n, tuple(float(v) for v in total / n)) for s, (n, total) in sorted(totals.items())},
        {site: part.small for site, part in sorted(parts.items()) if part.small})
