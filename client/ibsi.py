"""IBSI-1 compliance: pyradiomics feature names mapped to IBSI feature tags, and a comparison of
extracted values with the IBSI consensus reference values.

Used by the compliance test on the IBSI digital phantom and by ``myelofed ibsi-check``, which
lets a site verify its own installation before a study.

Every IBSI-1 feature of the digital phantom is compared: statistics, intensity histogram,
intensity-volume histogram, morphology, local intensity and the six texture families, each
texture family in 2D, 2.5D and 3D and, for GLCM and GLRLM, averaged and merged over directions
(the ``_avg`` and ``_comb`` tags). pyradiomics computes most of them; the project's ``ibsi``
class (:mod:`client.ibsi_features`) the rest. Mapping notes:

* ``Kurtosis``: pyradiomics reports kurtosis, IBSI excess kurtosis (= kurtosis - 3); the map
  applies the -3 offset.
* PCA axis lengths: pyradiomics' ``Major/Minor/LeastAxisLength`` use the population covariance
  of the voxel centres (N), IBSI's consensus values the sample covariance (N - 1): values differ
  by ``sqrt((N - 1) / N)``. The IBSI tags map to the ``ibsi`` class, which uses N - 1.
  Elongation and flatness are ratios and agree.
* Dissimilarity and sum variance equal difference average and cluster tendency (IBSI says so)
  and are mapped to those.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from client.extract import FeatureExtractor
from client.standardize import Volume, build_steps, standardize
from common.errors import ConfigError
from common.protocol import IBSI_FEATURES, load_protocol

# IBSI tag -> (pyradiomics feature name, conversion from the pyradiomics value to IBSI's).
_IDENTITY: Callable[[float], float] = lambda v: v  # noqa: E731


def _m(name: str, convert: Callable[[float], float] = _IDENTITY) -> tuple[str, Callable]:
    return name, convert


_FIRSTORDER = {
    "mean": "Mean", "var": "Variance", "skew": "Skewness", "median": "Median",
    "min": "Minimum", "p10": "10Percentile", "p90": "90Percentile", "max": "Maximum",
    "iqr": "InterquartileRange", "range": "Range", "mad": "MeanAbsoluteDeviation",
    "rmad": "RobustMeanAbsoluteDeviation", "energy": "Energy", "rms": "RootMeanSquared",
}
_GLCM = {
    "joint_max": "MaximumProbability", "joint_avg": "JointAverage", "joint_var": "SumSquares",
    "joint_entr": "JointEntropy", "diff_avg": "DifferenceAverage",
    "diff_var": "DifferenceVariance", "diff_entr": "DifferenceEntropy", "sum_avg": "SumAverage",
    "sum_var": "ClusterTendency", "sum_entr": "SumEntropy", "energy": "JointEnergy",
    "contrast": "Contrast", "dissimilarity": "DifferenceAverage", "inv_diff": "Id",
    "inv_diff_norm": "Idn", "inv_diff_mom": "Idm", "inv_diff_mom_norm": "Idmn",
    "inv_var": "InverseVariance", "corr": "Correlation", "auto_corr": "Autocorrelation",
    "clust_tend": "ClusterTendency", "clust_shade": "ClusterShade",
    "clust_prom": "ClusterProminence", "info_corr1": "Imc1", "info_corr2": "Imc2",
}
_GLRLM = {
    "sre": "ShortRunEmphasis", "lre": "LongRunEmphasis", "lgre": "LowGrayLevelRunEmphasis",
    "hgre": "HighGrayLevelRunEmphasis", "srlge": "ShortRunLowGrayLevelEmphasis",
    "srhge": "ShortRunHighGrayLevelEmphasis", "lrlge": "LongRunLowGrayLevelEmphasis",
    "lrhge": "LongRunHighGrayLevelEmphasis", "glnu": "GrayLevelNonUniformity",
    "glnu_norm": "GrayLevelNonUniformityNormalized", "rlnu": "RunLengthNonUniformity",
    "rlnu_norm": "RunLengthNonUniformityNormalized", "r_perc": "RunPercentage",
    "gl_var": "GrayLevelVariance", "rl_var": "RunVariance", "rl_entr": "RunEntropy",
}
_GLSZM = {
    "sze": "SmallAreaEmphasis", "lze": "LargeAreaEmphasis", "lgze": "LowGrayLevelZoneEmphasis",
    "hgze": "HighGrayLevelZoneEmphasis", "szlge": "SmallAreaLowGrayLevelEmphasis",
    "szhge": "SmallAreaHighGrayLevelEmphasis", "lzlge": "LargeAreaLowGrayLevelEmphasis",
    "lzhge": "LargeAreaHighGrayLevelEmphasis", "glnu": "GrayLevelNonUniformity",
    "glnu_norm": "GrayLevelNonUniformityNormalized", "zsnu": "SizeZoneNonUniformity",
    "zsnu_norm": "SizeZoneNonUniformityNormalized", "z_perc": "ZonePercentage",
    "gl_var": "GrayLevelVariance", "zs_var": "ZoneVariance", "zs_entr": "ZoneEntropy",
}
_GLDM = {
    "lde": "SmallDependenceEmphasis", "hde": "LargeDependenceEmphasis",
    "lgce": "LowGrayLevelEmphasis", "hgce": "HighGrayLevelEmphasis",
    "ldlge": "SmallDependenceLowGrayLevelEmphasis",
    "ldhge": "SmallDependenceHighGrayLevelEmphasis",
    "hdlge": "LargeDependenceLowGrayLevelEmphasis",
    "hdhge": "LargeDependenceHighGrayLevelEmphasis", "glnu": "GrayLevelNonUniformity",
    "dcnu": "DependenceNonUniformity", "dcnu_norm": "DependenceNonUniformityNormalized",
    "gl_var": "GrayLevelVariance", "dc_var": "DependenceVariance", "dc_entr": "DependenceEntropy",
}
_NGTDM = {k: k.capitalize()
          for k in ("coarseness", "contrast", "busyness", "complexity", "strength")}
_SHAPE = {
    "volume": "MeshVolume", "vol_approx": "VoxelVolume", "area_mesh": "SurfaceArea",
    "av": "SurfaceVolumeRatio", "sphericity": "Sphericity", "diam": "Maximum3DDiameter",
    "pca_maj_axis": "MajorAxisLength", "pca_min_axis": "MinorAxisLength",
    "pca_least_axis": "LeastAxisLength", "pca_elongation": "Elongation",
    "pca_flatness": "Flatness",
}


def _build_map() -> dict[str, tuple[str, Callable[[float], float]]]:
    """IBSI tag without its dimension suffix -> (feature name, conversion to IBSI's value)."""
    out: dict[str, tuple[str, Callable[[float], float]]] = {}
    for tag, name in _FIRSTORDER.items():
        out[f"stat_{tag}"] = _m(f"original_firstorder_{name}")
    out["stat_kurt"] = _m("original_firstorder_Kurtosis", lambda v: v - 3.0)
    for prefix, cls, table in (("cm", "glcm", _GLCM), ("rlm", "glrlm", _GLRLM),
                               ("szm", "glszm", _GLSZM), ("ngl", "gldm", _GLDM),
                               ("ngt", "ngtdm", _NGTDM), ("morph", "shape", _SHAPE)):
        for tag, name in table.items():
            out[f"{prefix}_{tag}"] = _m(f"original_{cls}_{name}")
    # The project's ``ibsi`` class: what pyradiomics lacks, and the PCA axis lengths with IBSI's
    # sample covariance (pyradiomics divides by N, IBSI's consensus values by N - 1).
    for tag in IBSI_FEATURES:
        out[tag] = _m(f"original_ibsi_{tag}")
    return out


#: IBSI tag (without the dimension suffix) -> (feature name, conversion to IBSI's value).
IBSI_TO_FEATURE = _build_map()

#: IBSI's texture aggregation suffixes -> (dimension, aggregation) of the protocol.
AGGREGATIONS: dict[str, tuple[str, str]] = {
    "_2D_avg": ("2D", "averaged"), "_2D_comb": ("2D", "merged"),
    "_2_5D_avg": ("2.5D", "averaged"), "_2_5D_comb": ("2.5D", "merged"),
    "_3D_avg": ("3D", "averaged"), "_3D_comb": ("3D", "merged"),
    "_2D": ("2D", "averaged"), "_2_5D": ("2.5D", "averaged"), "_3D": ("3D", "averaged"),
}

#: Tags whose difference from IBSI is understood and documented (tag -> cause); none today.
KNOWN_DEVIATIONS: dict[str, str] = {}


def split_tag(tag: str) -> tuple[str, tuple[str, str]]:
    """An IBSI tag's base and the (dimension, aggregation) it is computed under."""
    for suffix, configuration in AGGREGATIONS.items():
        if tag.endswith(suffix):
            return tag[: -len(suffix)], configuration
    return tag, ("3D", "averaged")


@dataclass(frozen=True)
class Comparison:
    tag: str
    feature: str
    family: str
    reference: float | None
    tolerance: float
    value: float | None
    status: str  # "pass", "fail", "known_deviation", "not_implemented", "not_standardized"

    @property
    def difference(self) -> float | None:
        if self.value is None or self.reference is None:
            return None
        return self.value - self.reference


def _reported_precision(text: str) -> float:
    """Half a unit of the last significant digit of a reference value as printed (IBSI reports
    three significant digits, often with tolerance 0)."""
    value = abs(float(text))
    if value == 0:
        return 0.0
    digits = len(text.lstrip("-").replace(".", "").lstrip("0").rstrip("0")) or 1
    digits = max(digits, 3)
    unit = 10 ** (math.floor(math.log10(value)) - digits + 1)
    return unit / 2


def compare_with_reference(features: dict[tuple[str, str], dict[str, float]],
                           reference_csv: Path) -> list[Comparison]:
    """Compare extracted features with the IBSI reference table (columns ``tag``, ``feature``,
    ``family``, ``reference value``, ``tolerance``), one row per tag: every dimension (2D,
    2.5D, 3D) and aggregation (averaged, merged) from ``features[(dimension, aggregation)]``."""
    rows = []
    with reference_csv.open(encoding="utf-8-sig", newline="") as fh:
        for row in csv.DictReader(fh):
            tag = row["tag"]
            if row["family"].startswith("Diagnostics"):  # image sizes and counts, not features
                continue
            base, configuration = split_tag(tag)
            ref_text = (row.get("reference value") or "").strip()
            tol_text = (row.get("tolerance") or "").strip()
            reference = float(ref_text) if ref_text else None
            tolerance = float(tol_text) if tol_text else 0.0
            mapped = IBSI_TO_FEATURE.get(base)
            extracted = features.get(configuration, {})
            value = None
            if mapped is not None and mapped[0] in extracted:
                value = mapped[1](extracted[mapped[0]])
            if reference is None:
                status = "not_standardized"
            elif value is None:
                status = "not_implemented"
            elif abs(value - reference) <= tolerance + _reported_precision(ref_text) + 1e-12:
                status = "pass"
            elif tag in KNOWN_DEVIATIONS:
                status = "known_deviation"
            else:
                status = "fail"
            rows.append(Comparison(tag, row["feature"], row["family"], reference, tolerance,
                                   value, status))
    return rows


#: Where the phantoms and reference tables may lie under the data folder: this project's layout
#: first, then that of IBSI's own repositories (``ibsi_1_digital_phantom/``,
#: ``ibsi_1_ct_radiomics_phantom/``, ``reference_values/``).
PHANTOM_DIRS = ("digital_phantom", "ibsi_1_digital_phantom")
CT_PHANTOM_DIRS = ("ct_radiomics_phantom", "ibsi_1_ct_radiomics_phantom")
REFERENCE_DIRS = (".", "reference_values")
REFERENCE_FILE = "ibsi_1_reference_values_digital_phantom.csv"

#: The checks ``myelofed ibsi-check`` runs: the digital phantom (no image processing) and IBSI-1
#: configurations A-E on the CT radiomics phantom (resampling, re-segmentation, outlier
#: filtering, fixed bin size and number), each with its preset.
CONFIGURATIONS = ("phantom", "A", "B", "C", "D", "E")


def _first(candidates: list[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def run_phantom_check(data_dir: Path, configuration: str = "phantom") -> list[Comparison]:
    """Extract an IBSI-1 phantom in ``data_dir`` through the whole site path (load, standardize,
    extract) with the configuration's preset, in every texture dimension and aggregation its
    reference table lists, and compare with the reference values.

    ``configuration``: ``phantom`` (the digital phantom) or ``A``-``E`` (the CT radiomics
    phantom under IBSI-1 configurations A-E).
    """
    if configuration not in CONFIGURATIONS:
        raise ConfigError(configuration, [f"unknown IBSI configuration; known: "
                                          f"{', '.join(CONFIGURATIONS)}"])
    digital = configuration == "phantom"
    dirs = PHANTOM_DIRS if digital else CT_PHANTOM_DIRS
    table = REFERENCE_FILE if digital else f"ibsi_1_reference_values_config_{configuration}.csv"
    image_path = _first([data_dir / d / "nifti" / "image" / "phantom.nii.gz" for d in dirs])
    mask_path = _first([data_dir / d / "nifti" / "mask" / "mask.nii.gz" for d in dirs])
    reference = _first([data_dir / d / table for d in REFERENCE_DIRS])
    if image_path is None or mask_path is None or reference is None:
        phantom = "{" + ",".join(dirs) + "}/nifti"
        raise ConfigError(str(data_dir), [
            f"missing the {what}: looked for {where}" for what, path, where in (
                ("image", image_path, f"{phantom}/image/phantom.nii.gz"),
                ("mask", mask_path, f"{phantom}/mask/mask.nii.gz"),
                ("reference values", reference,
                 "{" + ",".join(REFERENCE_DIRS) + "}/" + table))
            if path is None])
    protocol = load_protocol("preset:ibsi_digital_phantom" if digital
                             else f"preset:ibsi_ct_{configuration.lower()}")
    image = sitk.ReadImage(str(image_path), sitk.sitkFloat32)
    labels = sitk.ReadImage(str(mask_path), sitk.sitkUInt8)
    volume = standardize(Volume(image, labels, protocol.ingestion.roi_label),
                         build_steps(protocol))
    features = {}
    for dimension, aggregation in sorted(_configurations(reference)):
        variant = protocol.model_copy(update={"radiomics": protocol.radiomics.model_copy(update={
            "force_2d": dimension != "3D", "per_slice": dimension == "2D",
            "texture_aggregation": aggregation})})
        features[(dimension, aggregation)] = FeatureExtractor(variant).extract(
            volume.image, volume.morphological_roi(), volume.roi_for_intensity())
    return compare_with_reference(features, reference)


def _configurations(reference_csv: Path) -> set[tuple[str, str]]:
    """The (dimension, aggregation) pairs a reference table's tags ask for."""
    with reference_csv.open(encoding="utf-8-sig", newline="") as fh:
        return {split_tag(row["tag"])[1] for row in csv.DictReader(fh) if row.get("tag")}
