"""How good a mask the network made is: against a hand-drawn one (Dice and the 95th-percentile
Hausdorff distance per label, MONAI's metrics), and without one (the quality control that
decides whether a case may use it).

Quality control names, per label, what is wrong: absent (an empty mask); a volume outside the
training masks' range widened by ``segmentation.volume_margin``; fragmented (more than
``segmentation.max_fragment_share`` of its voxels outside its largest components, as many as
the training masks had at most). A case with a problem is not used; a case that passes is
marked as segmented automatically wherever its features go.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy import ndimage

from common.protocol import SegmentationSpec
from common.segmenter import SegmenterLabels


@dataclass(frozen=True)
class LabelShape:
    """One label of one mask: its volume (ml) and connected parts (26-connectivity), and the
    share of its voxels outside its ``k`` largest parts (``outside_largest[k - 1]``)."""

    volume_ml: float
    parts: int
    outside_largest: tuple[float, ...]


def label_shapes(mask: sitk.Image, labels: SegmenterLabels, max_parts: int = 16
                 ) -> dict[int, LabelShape]:
    """Each label's :class:`LabelShape` in a label map."""
    values = sitk.GetArrayViewFromImage(mask)
    voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    out = {}
    for value in labels.values:
        inside = values == value
        total = int(inside.sum())
        parts, count = ndimage.label(inside, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.sort(np.bincount(parts.ravel())[1:])[::-1] if count else np.zeros(0)
        outside = tuple(float(1.0 - sizes[:k].sum() / total) if total else 1.0
                        for k in range(1, max_parts + 1))
        out[value] = LabelShape(total * voxel_ml, int(count), outside)
    return out


def quality_problems(mask: sitk.Image, labels: SegmenterLabels, spec: SegmentationSpec,
                     volume_ml: Mapping[str, tuple[float, float]], parts: Mapping[str, int]
                     ) -> list[str]:
    """What is wrong with a mask the network made (empty list: it passes), per label, named;
    ``volume_ml`` and ``parts`` as :class:`common.segmenter.SegmenterHeader` keeps them."""
    problems = []
    shapes = label_shapes(mask, labels)
    for value, name in zip(labels.values, labels.names, strict=True):
        shape = shapes[value]
        what = f"label {value} ({name})"
        if shape.volume_ml == 0:
            problems.append(f"{what} is empty")
            continue
        if str(value) in volume_ml:
            low, high = volume_ml[str(value)]
            margin = spec.volume_margin * (high - low if high > low else high)
            if not low - margin <= shape.volume_ml <= high + margin:
                problems.append(f"{what}: {shape.volume_ml:.1f} ml, outside the training masks' "
                                f"{low:.1f}-{high:.1f} ml (widened by "
                                f"{spec.volume_margin:g} of the range)")
        k = min(max(parts.get(str(value), 1), 1), len(shape.outside_largest))
        if shape.outside_largest[k - 1] > spec.max_fragment_share:
            problems.append(f"{what} is fragmented: {shape.outside_largest[k - 1]:.0%} of it "
                            f"lies outside its {k} largest part(s) ({shape.parts} parts)")
    return problems


def agreement(predicted: sitk.Image, truth: sitk.Image, labels: SegmenterLabels
              ) -> dict[int, tuple[float, float]]:
    """Per label value: (Dice, 95th-percentile Hausdorff distance in mm) of a predicted mask
    against the reference on the same grid (MONAI's ``compute_dice`` and
    ``compute_hausdorff_distance`` with the grid's spacing). Dice is 1 where both are empty;
    the distance is NaN where either is."""
    a = sitk.GetArrayViewFromImage(predicted)
    b = sitk.GetArrayViewFromImage(truth)
    spacing = tuple(float(s) for s in truth.GetSpacing()[::-1])  # z, y, x like the arrays
    out = {}
    for value in labels.values:
        p = torch.from_numpy(np.ascontiguousarray(a == value))[None, None].float()
        t = torch.from_numpy(np.ascontiguousarray(b == value))[None, None].float()
        dice = float(compute_dice(p, t, include_background=True, ignore_empty=False)[0, 0])
        if p.any() and t.any():
            with warnings.catch_warnings():  # MONAI 1.5-1.6 warns about its own internal call
                warnings.simplefilter("ignore", FutureWarning)
                hd95 = float(compute_hausdorff_distance(p, t, include_background=True,
                                                        percentile=95, spacing=spacing)[0, 0])
        else:
            hd95 = float("nan")
        out[value] = (dice, hd95)
    return out


def mean_with_interval(values: np.ndarray, seed: int, resamples: int = 1000
                       ) -> tuple[float, float, float]:
    """The mean of per-case values with its 95% percentile-bootstrap interval over cases
    (NaN values left out; all NaN gives NaN)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)
