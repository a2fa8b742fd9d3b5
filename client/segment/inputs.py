"""What the segmentation network sees of a case, made without a mask, and its labels.

The input
    The image resampled (linear, IBSI's centre-aligned grid) to the network's spacing, one
    channel, array order ``(z, y, x)``. Intensities are scaled without a mask, so that a case
    that has none gets the same input as one that has: CT from a fixed window
    (:data:`CT_WINDOW` HU to 0-1), MR and PET from the image's own 0.5th and 99.5th percentiles
    to 0-1 (a scanner's gain, and a PET scan's dose, drop out), clipped to
    [:data:`CLIP_LOW`, :data:`CLIP_HIGH`]. The MR bias field is left to the network (its
    correction wants a body mask, and the training augmentation changes contrast anyway).

The labels
    The mask resampled to the same grid (nearest neighbour) as classes: 0 background, ``i + 1``
    for the label value ``labels.values[i]`` (:class:`common.segmenter.SegmenterLabels`).

The way back
    The network's class probabilities are resampled (linear) to the image's own grid and the
    most probable class kept there: a mask on the grid the case came with, label values as the
    protocol numbers them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from client.limits import Budget, check_voxels
from client.standardize import ibsi_grid
from common.protocol import Modality
from common.segmenter import SegmenterLabels, network_spacing

__all__ = ["NetworkInput", "network_classes", "network_input", "network_spacing",
           "scale_intensities", "to_source"]

#: CT's window, HU, mapped to 0-1.
CT_WINDOW = (-1000.0, 2000.0)
#: MR and PET: the percentiles mapped to 0 and 1.
PERCENTILES = (0.5, 99.5)
#: Scaled intensities are clipped to this range.
CLIP_LOW, CLIP_HIGH = -0.5, 1.5


@dataclass(frozen=True)
class NetworkInput:
    """One case as the network sees it: ``values`` float32 (z, y, x) on ``grid`` (a SimpleITK
    image of the network grid's geometry), and ``source`` the image as read (its grid is where
    a mask goes back to)."""

    values: np.ndarray
    grid: sitk.Image
    source: sitk.Image


def scale_intensities(values: np.ndarray, modality: Modality) -> np.ndarray:
    """The mask-free intensity scaling of the module docstring, float32."""
    if modality is Modality.CT:
        low, high = CT_WINDOW
    else:
        low, high = (float(p) for p in np.percentile(values, PERCENTILES))
        if not high > low:  # a constant image: nothing to scale
            high = low + 1.0
    scaled = (values.astype(np.float32) - low) / (high - low)
    return np.clip(scaled, CLIP_LOW, CLIP_HIGH).astype(np.float32)


def network_input(image: sitk.Image, spacing_zyx: tuple[float, float, float],
                  modality: Modality, budget: Budget | int) -> NetworkInput:
    """The network's input of an image (see the module docstring); its grid is checked against
    the site's ``budget`` before it is made."""
    size, origin, spacing = ibsi_grid(image, spacing_zyx[::-1], in_plane_only=False)
    check_voxels(size, "the segmentation grid", budget)
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetOrigin(origin)
    grid.SetSpacing(spacing)
    grid.SetDirection(image.GetDirection())
    resampled = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, sitk.Transform(),
                              sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)
    values = scale_intensities(sitk.GetArrayFromImage(resampled), modality)
    return NetworkInput(values, grid, image)


def network_classes(labels: sitk.Image, grid: sitk.Image, classes: SegmenterLabels
                    ) -> np.ndarray:
    """A label map as the network's classes on ``grid`` (uint8, z-y-x; nearest neighbour)."""
    resampled = sitk.GetArrayFromImage(sitk.Resample(labels, grid, sitk.Transform(),
                                                     sitk.sitkNearestNeighbor, 0,
                                                     sitk.sitkUInt8, True))
    out = np.zeros(resampled.shape, dtype=np.uint8)
    for index, value in enumerate(classes.values, start=1):
        out[resampled == value] = index
    return out


def to_source(probabilities: np.ndarray, item: NetworkInput, classes: SegmenterLabels,
              budget: Budget | int) -> sitk.Image:
    """Class probabilities (n_classes, z, y, x) on the network grid as a label map (UInt8) on
    the case's own grid: each class resampled linearly, the most probable kept."""
    check_voxels([*item.source.GetSize(), len(probabilities)], "the mask's class maps", budget)
    stacked = []
    for channel in probabilities:
        image = sitk.GetImageFromArray(np.ascontiguousarray(channel, dtype=np.float32))
        image.CopyInformation(item.grid)
        stacked.append(sitk.GetArrayFromImage(sitk.Resample(
            image, item.source, sitk.Transform(), sitk.sitkLinear,
            1.0 if not stacked else 0.0, sitk.sitkFloat32, True)))
    winner = np.argmax(np.stack(stacked), axis=0)
    values = np.zeros(winner.shape, dtype=np.uint8)
    for index, value in enumerate(classes.values, start=1):
        values[winner == index] = value
    mask = sitk.GetImageFromArray(values)
    mask.CopyInformation(item.source)
    return mask
