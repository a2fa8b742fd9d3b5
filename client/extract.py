"""Radiomic feature extraction with pyradiomics under the study protocol.

The project standardizes the image itself (:mod:`client.standardize`) and hands pyradiomics the
result with its own preprocessing switched off (no resampling, no normalization, no
re-segmentation). Two IBSI details are handled here:

* shape (morphology) features are computed on the morphological mask and every other class on
  the re-segmented intensity mask;
* fixed-bin-size discretization starts at the lower re-segmentation bound (IBSI), not at a
  multiple of the bin width below the ROI minimum (pyradiomics' own rule). pyradiomics exposes
  discretization as the ``_applyBinning`` hook of its feature classes; the subclasses below
  override that hook only, for the extractor instance built here (no process-wide patching).

IBSI's texture aggregation methods map onto pyradiomics as follows: 3D is its default, 2.5D is
``force2D`` (each direction's matrix accumulated over all slices), 2D runs the texture classes
once per slice and averages the features over slices; ``merged`` sums the GLCM and GLRLM over
directions before the features (pyradiomics' ``weightingNorm = no_weighting``). The ``ibsi``
class (:mod:`client.ibsi_features`) is computed on the original image with the same
discretization.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterator
from functools import cache
from typing import Any

import numpy as np
import radiomics
import SimpleITK as sitk
from radiomics import featureextractor, getFeatureClasses, imageoperations

from client import ibsi_features
from client.limits import check_bins
from common.errors import CaseError, SkipReason
from common.protocol import RadiomicsSpec, StudyProtocol

# pyradiomics logs per-feature notes (e.g. "Sum Average = 2 * Joint Average") as warnings on its
# own handler; the site's ingestion report says what matters.
radiomics.setVerbosity(logging.ERROR)
logging.getLogger("radiomics").setLevel(logging.ERROR)

_LOWER_BOUND_KEY = "ibsiLowerBound"
_GREY_LEVELS_KEY = "ibsiGreyLevels"


def fixed_bin_size(values: np.ndarray, width: float, low: float) -> np.ndarray:
    """IBSI fixed-bin-size grey levels (from 1) of ``values``. The tiny epsilon keeps a value
    that sits on a bin edge in the upper bin despite floating-point division
    (0.3 / 0.1 = 2.9999999999999996)."""
    return np.floor((values - low) / width + 1e-9).astype(int) + 1


def discretize(array: np.ndarray, mask: np.ndarray, settings: dict[str, Any]) -> np.ndarray:
    """Grey levels (from 1) of the voxels in ``mask`` (0 elsewhere) under pyradiomics-style
    settings: ``binCount`` (pyradiomics' fixed bin number) or ``binWidth`` with IBSI's lower
    bound (the re-segmentation bound when set, else the ROI minimum)."""
    levels = np.zeros(array.shape, dtype=np.int64)
    values = array[mask].astype(np.float64)
    if settings.get("binCount") is not None:
        binned, _ = imageoperations.binImage(array, np.nonzero(mask),
                                             binCount=settings["binCount"])
        levels[mask] = binned[mask]
        return levels
    width = float(settings["binWidth"])
    low = settings.get(_LOWER_BOUND_KEY)
    if low is None:
        low = float(values.min())
    check_bins(int(np.floor((float(values.max()) - low) / width + 1e-9)) + 1,
               f"fixed bin size {width:g} over [{low:g}, {float(values.max()):g}]")
    levels[mask] = fixed_bin_size(values, width, low)
    return levels


class _IbsiFixedBinSize:
    """IBSI fixed-bin-size discretization: ``floor((x - x_min) / w) + 1``, where ``x_min`` is
    the lower re-segmentation bound if the protocol sets one, else the ROI minimum."""

    settings: dict[str, Any]
    maskArray: np.ndarray
    coefficients: dict[str, Any]

    def _applyBinning(self, matrix: np.ndarray) -> np.ndarray:  # noqa: N802 (pyradiomics hook)
        binned = discretize(matrix, self.maskArray, self.settings)
        self.coefficients["grayLevels"] = np.unique(binned[self.maskArray])
        self.coefficients["Ng"] = int(np.max(self.coefficients["grayLevels"]))
        return binned


class _PreBinned:
    """For IBSI 2D (one slice at a time): the image already holds the grey levels of the whole
    ROI, and ``Ng`` is the whole ROI's (normalised inverse differences divide by it)."""

    settings: dict[str, Any]
    maskArray: np.ndarray
    coefficients: dict[str, Any]

    def _applyBinning(self, matrix: np.ndarray) -> np.ndarray:  # noqa: N802 (pyradiomics hook)
        binned = np.rint(matrix).astype(int)
        self.coefficients["grayLevels"] = np.unique(binned[self.maskArray])
        self.coefficients["Ng"] = int(self.settings[_GREY_LEVELS_KEY])
        return binned


@cache
def _binning_classes(mixin: type) -> dict[str, type]:
    """pyradiomics' feature classes with ``mixin``'s binning hook (shape classes unchanged)."""
    classes = {}
    for name, cls in getFeatureClasses().items():
        if name.startswith("shape"):
            classes[name] = cls
        else:
            # Keep pyradiomics' module so the class logs to the (quietened) radiomics logger.
            classes[name] = type(f"{mixin.__name__.strip('_')}{cls.__name__}", (mixin, cls),
                                 {"__module__": cls.__module__})
    return classes


class _Extractor(featureextractor.RadiomicsFeatureExtractor):  # type: ignore[misc]
    """pyradiomics' extractor, computing non-shape classes with the IBSI binning subclasses when
    the protocol asks for fixed bin size."""

    def __init__(self, ibsi_binning: bool, per_slice: bool = False, **settings: Any) -> None:
        super().__init__(**settings)
        self._classes = (_binning_classes(_IbsiFixedBinSize) if ibsi_binning
                         else getFeatureClasses())
        self._per_slice = per_slice

    def computeFeatures(  # noqa: N802 (pyradiomics API)
        self, image: sitk.Image, mask: sitk.Image, imageTypeName: str, **kwargs: Any  # noqa: N803
    ) -> OrderedDict[str, Any]:
        features: OrderedDict[str, Any] = OrderedDict()
        slices: list[sitk.Image] = []
        if self._per_slice:
            # IBSI 2D: the whole ROI is discretized once, then each slice's matrices are built.
            array = sitk.GetArrayFromImage(image)
            inside = sitk.GetArrayViewFromImage(mask) == kwargs.get("label", 1)
            levels = discretize(array, inside, kwargs)
            binned = sitk.GetImageFromArray(levels.astype(np.float32))
            binned.CopyInformation(image)
            slices = list(_slice_masks(mask))
            sliced = {**kwargs, _GREY_LEVELS_KEY: int(levels[inside].max())}
        for class_name, names in self.enabledFeatures.items():
            if class_name.startswith("shape") or class_name == "ibsi":
                continue
            per_mask: dict[str, list[float]] = {}
            runs = [(self._classes[class_name], image, mask, kwargs)]
            if slices and class_name != "firstorder":
                runs = [(_binning_classes(_PreBinned)[class_name], binned, one, sliced)
                        for one in slices]
            for cls, source, one, settings in runs:
                instance = cls(source, one, **settings)
                for name in names or ():
                    instance.enableFeatureByName(name)
                for name, value in instance.execute().items():
                    per_mask.setdefault(name, []).append(float(np.asarray(value)))
            for name, values in per_mask.items():
                # IBSI 2D: every slice's features, averaged over the slices.
                features[f"{imageTypeName}_{class_name}_{name}"] = (
                    float(np.nanmean(values)) if not all(map(math.isnan, values)) else math.nan)
        return features


def _slice_masks(mask: sitk.Image) -> Iterator[sitk.Image]:
    """One mask per slice (first array axis) that holds ROI voxels, on the full grid."""
    array = sitk.GetArrayViewFromImage(mask)
    for z in np.flatnonzero(array.reshape(array.shape[0], -1).any(axis=1)):
        one = np.zeros(array.shape, dtype=np.uint8)
        one[z] = array[z]
        image = sitk.GetImageFromArray(one)
        image.CopyInformation(mask)
        yield image


def pyradiomics_settings(spec: RadiomicsSpec) -> dict[str, Any]:
    """The pyradiomics settings equivalent to the protocol's radiomics section, with every
    pyradiomics preprocessing step off (the project did it already)."""
    settings: dict[str, Any] = {
        "label": 1,
        "additionalInfo": False,
        "normalize": False,
        "resampledPixelSpacing": None,
        "preCrop": False,
        "correctMask": False,
        "minimumROIDimensions": 1,
        "minimumROISize": None,
        "force2D": spec.force_2d,
        "force2Ddimension": 0,
        "distances": list(spec.glcm_distances),
        "gldm_a": spec.gldm_alpha,
    }
    if spec.discretization == "fixed_bin_size":
        settings["binWidth"] = spec.bin_width
    else:
        settings["binCount"] = spec.bin_count
    if spec.texture_aggregation == "merged":
        settings["weightingNorm"] = "no_weighting"
    return settings


class FeatureExtractor:
    """Extracts one case's features under a protocol.

    Built once per worker process and reused for every case (pyradiomics extractors are
    stateless between ``execute`` calls).
    """

    def __init__(self, protocol: StudyProtocol) -> None:
        spec = protocol.radiomics
        self.spec = spec
        settings = pyradiomics_settings(spec)
        ibsi = spec.discretization == "fixed_bin_size"
        self.lower_bound: float | None = None
        rng = protocol.standardization.resegmentation_range
        self._reseg_range = rng
        if ibsi and rng is not None and math.isfinite(rng[0]):
            self.lower_bound = float(rng[0])
        # the original image's discretization, as its texture classes have it (the ibsi class)
        self._original_settings = settings if self.lower_bound is None else {
            **settings, _LOWER_BOUND_KEY: self.lower_bound}

        shape_classes = {k: list(v) for k, v in spec.feature_classes.items()
                         if k.startswith("shape")}
        other_classes = {
            k: list(v) for k, v in spec.feature_classes.items()
            if not k.startswith("shape") and k != "ibsi"
        }
        self._ibsi = spec.feature_classes.get("ibsi")
        self._shape = None
        if shape_classes:
            self._shape = _Extractor(False, **settings)
            self._shape.disableAllFeatures()
            self._shape.enableFeaturesByName(**shape_classes)
            self._shape.enableImageTypes(Original={})
        self._texture = None
        if other_classes:
            self._texture = _Extractor(ibsi, spec.per_slice, **settings)
            self._texture.disableAllFeatures()
            self._texture.enableFeaturesByName(**other_classes)
            image_types: dict[str, dict[str, Any]] = {}
            if spec.image_types.original:
                original: dict[str, Any] = {}
                if self.lower_bound is not None:
                    original[_LOWER_BOUND_KEY] = self.lower_bound
                image_types["Original"] = original
            if spec.image_types.log_sigma_mm:
                image_types["LoG"] = {"sigma": list(spec.image_types.log_sigma_mm)}
            if spec.image_types.wavelet:
                image_types["Wavelet"] = {}
            self._texture.disableAllImageTypes()
            self._texture.enableImageTypes(**image_types)

    def extract(self, image: sitk.Image, morph_mask: sitk.Image, intensity_mask: sitk.Image
                ) -> dict[str, float]:
        """Feature name -> value for one case.

        Parameters
        ----------
        image
            The standardized image (float32).
        morph_mask, intensity_mask
            UInt8 0/1 masks on the image grid: before and after re-segmentation.
        """
        out: dict[str, float] = {}
        try:
            if self._shape is not None:
                out.update(_as_floats(self._shape.execute(image, morph_mask)))
            if self._texture is not None:
                out.update(_as_floats(self._texture.execute(image, intensity_mask)))
            if self._ibsi is not None:
                out.update(self._ibsi_features(image, morph_mask, intensity_mask))
        except CaseError:
            raise
        except (ValueError, RuntimeError, IndexError) as exc:
            raise CaseError(SkipReason.EXTRACTION_FAILED, f"pyradiomics: {exc}") from None
        return out

    def _ibsi_features(self, image: sitk.Image, morph_mask: sitk.Image,
                       intensity_mask: sitk.Image) -> dict[str, float]:
        """The ``ibsi`` class, on the original image discretized as pyradiomics' classes are."""
        array = sitk.GetArrayFromImage(image).astype(np.float64)
        morph = sitk.GetArrayFromImage(morph_mask).astype(bool)
        intensity = sitk.GetArrayFromImage(intensity_mask).astype(bool)
        if not intensity.any() or not morph.any():
            raise CaseError(SkipReason.EXTRACTION_FAILED, "ibsi features: the ROI is empty")
        spacing = image.GetSpacing()[::-1]
        features = ibsi_features.compute(
            array, morph, intensity, discretize(array, intensity, self._original_settings),
            (spacing[0], spacing[1], spacing[2]), self.spec.dimension, self.spec.gldm_alpha,
            names=tuple(self._ibsi or ()), ivh=self._ivh_levels(array, intensity))
        return {f"original_ibsi_{name}": value for name, value in features.items()}

    def _ivh_levels(self, array: np.ndarray, mask: np.ndarray
                    ) -> tuple[np.ndarray, float, float]:
        """The intensity-volume histogram's intensities and the range its intensity fractions
        span (IBSI 3.5), under the protocol's own IVH discretization: ``none`` (the intensities
        and the ROI's range), ``fixed_bin_size`` (bin centres; the re-segmentation range where
        finite) or ``fixed_bin_number`` (bin numbers 1..N)."""
        spec = self.spec
        values = array[mask].astype(np.float64)
        if spec.ivh_discretization == "none":
            return values, float(values.min()), float(values.max())
        if spec.ivh_discretization == "fixed_bin_number":
            count = int(spec.ivh_bin_count or 1)
            levels = discretize(array, mask, {"binCount": count})[mask].astype(np.float64)
            return levels, 1.0, float(count)
        width = float(spec.ivh_bin_width or 1.0)
        rng = self._reseg_range
        low = rng[0] if rng is not None and math.isfinite(rng[0]) else float(values.min())
        high = rng[1] if rng is not None and math.isfinite(rng[1]) else float(values.max())
        levels = discretize(array, mask, {"binWidth": width, _LOWER_BOUND_KEY: low})[mask]
        return low + (levels - 0.5) * width, low, high


def _as_floats(values: dict[str, Any]) -> dict[str, float]:
    return {name: float(np.asarray(v)) for name, v in values.items() if not name.startswith("diag")}
