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
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from functools import cache
from typing import Any

import numpy as np
import radiomics
import SimpleITK as sitk
from radiomics import featureextractor, getFeatureClasses

from client.limits import check_bins
from common.errors import CaseError, SkipReason
from common.protocol import RadiomicsSpec, StudyProtocol

# pyradiomics logs per-feature notes (e.g. "Sum Average = 2 * Joint Average") as warnings on its
# own handler; the site's ingestion report says what matters.
radiomics.setVerbosity(logging.ERROR)
logging.getLogger("radiomics").setLevel(logging.ERROR)

_LOWER_BOUND_KEY = "ibsiLowerBound"


class _IbsiFixedBinSize:
    """IBSI fixed-bin-size discretization: ``floor((x - x_min) / w) + 1``, where ``x_min`` is
    the lower re-segmentation bound if the protocol sets one, else the ROI minimum."""

    settings: dict[str, Any]
    maskArray: np.ndarray
    coefficients: dict[str, Any]

    def _applyBinning(self, matrix: np.ndarray) -> np.ndarray:  # noqa: N802 (pyradiomics hook)
        width = float(self.settings["binWidth"])
        values = matrix[self.maskArray].astype(np.float64)
        low = self.settings.get(_LOWER_BOUND_KEY)
        if low is None:
            low = float(values.min())
        check_bins(int(np.floor((float(values.max()) - low) / width + 1e-9)) + 1,
                   f"fixed bin size {width:g} over [{low:g}, {float(values.max()):g}]")
        binned = np.zeros(matrix.shape, dtype=int)
        # The tiny epsilon keeps a value that sits on a bin edge in the upper bin despite
        # floating-point division (0.3 / 0.1 = 2.9999999999999996).
        binned[self.maskArray] = np.floor((values - low) / width + 1e-9).astype(int) + 1
        self.coefficients["grayLevels"] = np.unique(binned[self.maskArray])
        self.coefficients["Ng"] = int(np.max(self.coefficients["grayLevels"]))
        return binned


@cache
def _ibsi_feature_classes() -> dict[str, type]:
    classes = {}
    for name, cls in getFeatureClasses().items():
        if name.startswith("shape"):
            classes[name] = cls
        else:
            # Keep pyradiomics' module so the class logs to the (quietened) radiomics logger.
            classes[name] = type(f"Ibsi{cls.__name__}", (_IbsiFixedBinSize, cls),
                                 {"__module__": cls.__module__})
    return classes


class _Extractor(featureextractor.RadiomicsFeatureExtractor):  # type: ignore[misc]
    """pyradiomics' extractor, computing non-shape classes with the IBSI binning subclasses when
    the protocol asks for fixed bin size."""

    def __init__(self, ibsi_binning: bool, **settings: Any) -> None:
        super().__init__(**settings)
        self._classes = _ibsi_feature_classes() if ibsi_binning else getFeatureClasses()

    def computeFeatures(  # noqa: N802 (pyradiomics API)
        self, image: sitk.Image, mask: sitk.Image, imageTypeName: str, **kwargs: Any  # noqa: N803
    ) -> OrderedDict[str, Any]:
        features: OrderedDict[str, Any] = OrderedDict()
        for class_name, names in self.enabledFeatures.items():
            if class_name.startswith("shape"):
                continue
            instance = self._classes[class_name](image, mask, **kwargs)
            for name in names or ():
                instance.enableFeatureByName(name)
            for name, value in instance.execute().items():
                features[f"{imageTypeName}_{class_name}_{name}"] = value
        return features


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
        if ibsi and rng is not None and math.isfinite(rng[0]):
            self.lower_bound = float(rng[0])

        shape_classes = {k: list(v) for k, v in spec.feature_classes.items()
                         if k.startswith("shape")}
        other_classes = {
            k: list(v) for k, v in spec.feature_classes.items() if not k.startswith("shape")
        }
        self._shape = None
        if shape_classes:
            self._shape = _Extractor(False, **settings)
            self._shape.disableAllFeatures()
            self._shape.enableFeaturesByName(**shape_classes)
            self._shape.enableImageTypes(Original={})
        self._texture = None
        if other_classes:
            self._texture = _Extractor(ibsi, **settings)
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
        except CaseError:
            raise
        except (ValueError, RuntimeError, IndexError) as exc:
            raise CaseError(SkipReason.EXTRACTION_FAILED, f"pyradiomics: {exc}") from None
        return out


def _as_floats(values: dict[str, Any]) -> dict[str, float]:
    return {name: float(np.asarray(v)) for name, v in values.items() if not name.startswith("diag")}
