"""The study protocol: one typed, hashed description of what every site computes.

A protocol is written once by the coordinator (TOML or YAML), validated here, and carried to every
site. Its content hash (:meth:`StudyProtocol.content_hash`) travels with every site result, so two
numbers can only be compared when they were computed under the same protocol.

Later phases (harmonization, models, federation) add their own sections to :class:`StudyProtocol`.

Longer than 400 lines: it is one pydantic schema. Every class here is a section of
:class:`StudyProtocol` or a type a section uses; its validator checks the sections against each
other (the modality against standardization, normalization against ingestion, the model's
clinical factors against the covariates), and its JSON schema generates the protocol reference
of the docs. Split by section, one document would be read across files. The loaders at the end
(about 50 lines) are the schema's way in from a file.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common.errors import ConfigError
from common.presets import preset_path

SCHEMA_VERSION: Final = 1

#: Feature classes a protocol may enable: pyradiomics' and ``ibsi`` (the IBSI-1 features
#: pyradiomics lacks, computed by the project: :mod:`client.ibsi_features`).
FEATURE_CLASSES = ("shape", "shape2D", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm",
                   "ibsi")

#: The ``ibsi`` class's features, named by their IBSI tag without the dimension suffix.
IBSI_FEATURES: tuple[str, ...] = (
    *(f"morph_{t}" for t in (
        "pca_maj_axis", "pca_min_axis", "pca_least_axis", "comp_1", "comp_2", "sph_dispr",
        "asphericity", "com", "integ_int", "vol_dens_aabb", "area_dens_aabb", "vol_dens_aee",
        "area_dens_aee", "vol_dens_conv_hull", "area_dens_conv_hull", "moran_i", "geary_c")),
    "loc_peak_loc", "loc_peak_glob",
    *(f"stat_{t}" for t in ("medad", "cov", "qcod")),
    *(f"ih_{t}" for t in (
        "mean", "var", "skew", "kurt", "median", "min", "p10", "p90", "max", "mode", "iqr",
        "range", "mad", "rmad", "medad", "cov", "qcod", "entropy", "uniformity", "max_grad",
        "max_grad_g", "min_grad", "min_grad_g")),
    *(f"ivh_{t}" for t in ("v10", "v90", "i10", "i90", "diff_v10_v90", "diff_i10_i90")),
    *(f"dzm_{t}" for t in (
        "sde", "lde", "lgze", "hgze", "sdlge", "sdhge", "ldlge", "ldhge", "glnu", "glnu_norm",
        "zdnu", "zdnu_norm", "z_perc", "gl_var", "zd_var", "zd_entr")),
    *(f"ngl_{t}" for t in ("glnu_norm", "dc_perc", "dc_energy")),
)

#: Every feature pyradiomics 3.1 computes per class, deprecated ones included (they are computed
#: when named): a protocol naming another is refused before any case is extracted
#: (``tests/client/test_extract.py`` holds this table to the installed pyradiomics).
FEATURE_NAMES: dict[str, frozenset[str]] = {
    "shape": frozenset("""
        Compactness1 Compactness2 Elongation Flatness LeastAxisLength MajorAxisLength
        Maximum2DDiameterColumn Maximum2DDiameterRow Maximum2DDiameterSlice Maximum3DDiameter
        MeshVolume MinorAxisLength SphericalDisproportion Sphericity SurfaceArea
        SurfaceVolumeRatio VoxelVolume
    """.split()),
    "shape2D": frozenset("""
        Elongation MajorAxisLength MaximumDiameter MeshSurface MinorAxisLength Perimeter
        PerimeterSurfaceRatio PixelSurface SphericalDisproportion Sphericity
    """.split()),
    "firstorder": frozenset("""
        10Percentile 90Percentile Energy Entropy InterquartileRange Kurtosis Maximum Mean
        MeanAbsoluteDeviation Median Minimum Range RobustMeanAbsoluteDeviation RootMeanSquared
        Skewness StandardDeviation TotalEnergy Uniformity Variance
    """.split()),
    "glcm": frozenset("""
        Autocorrelation ClusterProminence ClusterShade ClusterTendency Contrast Correlation
        DifferenceAverage DifferenceEntropy DifferenceVariance Dissimilarity Homogeneity1
        Homogeneity2 Id Idm Idmn Idn Imc1 Imc2 InverseVariance JointAverage JointEnergy
        JointEntropy MCC MaximumProbability SumAverage SumEntropy SumSquares SumVariance
    """.split()),
    "glrlm": frozenset("""
        GrayLevelNonUniformity GrayLevelNonUniformityNormalized GrayLevelVariance
        HighGrayLevelRunEmphasis LongRunEmphasis LongRunHighGrayLevelEmphasis
        LongRunLowGrayLevelEmphasis LowGrayLevelRunEmphasis RunEntropy RunLengthNonUniformity
        RunLengthNonUniformityNormalized RunPercentage RunVariance ShortRunEmphasis
        ShortRunHighGrayLevelEmphasis ShortRunLowGrayLevelEmphasis
    """.split()),
    "glszm": frozenset("""
        GrayLevelNonUniformity GrayLevelNonUniformityNormalized GrayLevelVariance
        HighGrayLevelZoneEmphasis LargeAreaEmphasis LargeAreaHighGrayLevelEmphasis
        LargeAreaLowGrayLevelEmphasis LowGrayLevelZoneEmphasis SizeZoneNonUniformity
        SizeZoneNonUniformityNormalized SmallAreaEmphasis SmallAreaHighGrayLevelEmphasis
        SmallAreaLowGrayLevelEmphasis ZoneEntropy ZonePercentage ZoneVariance
    """.split()),
    "gldm": frozenset("""
        DependenceEntropy DependenceNonUniformity DependenceNonUniformityNormalized
        DependencePercentage DependenceVariance GrayLevelNonUniformity
        GrayLevelNonUniformityNormalized GrayLevelVariance HighGrayLevelEmphasis
        LargeDependenceEmphasis LargeDependenceHighGrayLevelEmphasis
        LargeDependenceLowGrayLevelEmphasis LowGrayLevelEmphasis SmallDependenceEmphasis
        SmallDependenceHighGrayLevelEmphasis SmallDependenceLowGrayLevelEmphasis
    """.split()),
    "ngtdm": frozenset("""
        Busyness Coarseness Complexity Contrast Strength
    """.split()),
    "ibsi": frozenset(IBSI_FEATURES),
}

#: The most grey levels a discretization may give: pyradiomics' texture matrices grow with their
#: square (a GLCM of 1,024 levels in 13 directions is 110 MB), and IBSI's configurations use 32
#: to a few hundred.
MAX_BINS = 1024

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: A clinical value or axis bound: finite and within +/- 10^9 (any lab unit fits).
Finite = Annotated[float, Field(ge=-1e9, le=1e9, allow_inf_nan=False)]
#: A physical size in mm: from a tenth of a millimetre (micro-CT is out of scope) to 10 cm.
Millimetres = Annotated[float, Field(ge=0.1, le=100, allow_inf_nan=False)]


class _Frozen(BaseModel):
    # Infinity is a legitimate open bound (e.g. SUV >= 0): keep it through JSON, not as null.
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class Modality(str, enum.Enum):
    CT = "CT"
    MR = "MR"
    PET = "PET"


class TaskKind(str, enum.Enum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    SURVIVAL = "survival"


class TaskSpec(_Frozen):
    """What is predicted, and from which manifest column.
    For classification the label is either 0/1, or text when ``classes`` names the two values
    (negative first, positive second), e.g. ``["metastasis", "myeloma"]``.
    For regression ``value_range`` bounds the label (e.g. plasma-cell infiltration 0-100 %).
    For survival (a Cox model stratified by site) the label is the follow-up time in months (e.g.
    ``pfs_months``) and ``event_column`` says whether it ended in the event (1: progression or
    death) or was censored (0); the validation reports at ``validation.times``.
    """
    kind: TaskKind
    label_column: str = "label"
    classes: tuple[str, str] | None = None
    value_range: tuple[Finite, Finite] | None = None
    event_column: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        survival = self.kind is TaskKind.SURVIVAL
        if survival and not self.event_column:
            raise ValueError("a survival task needs 'event_column' (1 = event, 0 = censored)")
        if not survival and self.event_column is not None:
            raise ValueError("'event_column' only applies to survival tasks")
        if survival and (self.classes is not None or self.value_range is not None):
            raise ValueError("'classes' and 'value_range' do not apply to survival tasks")
        if self.event_column == self.label_column:
            raise ValueError("'event_column' must differ from 'label_column' (the time)")
        if self.kind is TaskKind.REGRESSION and self.classes is not None:
            raise ValueError("'classes' only applies to classification tasks")
        if self.kind is TaskKind.CLASSIFICATION and self.value_range is not None:
            raise ValueError("'value_range' only applies to regression tasks")
        if self.classes is not None and self.classes[0] == self.classes[1]:
            raise ValueError("'classes' must name two different values")
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise ValueError("'value_range' must be [low, high] with low < high")
        return self


class CovariateSpec(_Frozen):
    """Clinical covariates read from the manifest.
    ``categorical`` maps each column to its study-wide list of levels (a site may lack a level; a
    value outside the list makes the case invalid). ``continuous`` lists numeric columns.
    ``harmonize`` names the covariates ComBat protects (absent = all): each categorical one
    splits every scanner into cells that must hold at least ComBat's ``min_cell`` patients, and
    its levels crossed with every other categorical one (the outcome among them, below) count
    patients in ComBat's sums, so every crossing at a site must hold 0 or at least the site's
    ``min_patients`` (its release ledger refuses ComBat otherwise, and the site's models use
    raw features). A many-level factor used only by the nomogram (e.g. ISS stage), or sex at
    small sites, is better left out of it.
    ``protect_outcome`` (default on): ComBat also protects the task's label while it estimates
    the scanner effects on training rows, so that a scanner seeing more myeloma (a referral
    pathway) keeps that difference; harmonizing a row does not need its label. A classification
    label then splits every scanner at every site into two cells of at least ``min_cell``.
    """
    categorical: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    continuous: tuple[str, ...] = ()
    harmonize: tuple[str, ...] | None = None
    protect_outcome: bool = True

    @model_validator(mode="after")
    def _check(self) -> CovariateSpec:
        for column, levels in self.categorical.items():
            if len(levels) < 2:
                raise ValueError(f"categorical covariate '{column}' needs at least two levels")
            if len(set(levels)) != len(levels):
                raise ValueError(f"categorical covariate '{column}' lists a level twice")
        both = set(self.categorical) & set(self.continuous)
        if both:
            raise ValueError(f"columns both categorical and continuous: {sorted(both)}")
        unknown = set(self.harmonize or ()) - set(self.columns)
        if unknown:
            raise ValueError(f"harmonize names {sorted(unknown)}, which are not covariates")
        return self

    def harmonized(self, column: str) -> bool:
        """Whether ComBat protects ``column``."""
        return self.harmonize is None or column in self.harmonize

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.categorical) + self.continuous


class CovbatSpec(_Frozen):
    """CovBat (Chen et al. 2022) after ComBat: the scanners' effects on the features'
    covariance. The pooled ComBat residuals' leading principal components (the fewest that
    explain more than ``pct_var`` of their variance, or ``n_pc`` of them when it is above 0; the
    authors' names) have their scores harmonized per scanner by a location-scale ComBat, then
    are mapped back (:mod:`harmonization.covbat`)."""
    pct_var: float = Field(0.95, gt=0, lt=1, allow_inf_nan=False)
    n_pc: int = Field(0, ge=0, le=10_000)


class EmbeddingHarmonySpec(_Frozen):
    """Federated Harmony (Korsunsky et al. 2019; :mod:`harmonization.federated_harmony`) on the
    CNN's embeddings: each case's penultimate-layer activations of the final global network,
    reduced to their ``n_components`` leading principal components (from the sites' pooled
    sums), clustered softly with a diversity penalty and corrected per scanner within each
    cluster. The other fields are harmonypy's (``n_clusters`` absent: min(N / 30, 100)). The
    report gives the scanners' mixing (LISI) before and after."""
    n_components: int = Field(10, ge=2, le=100)
    theta: float = Field(2.0, ge=0, le=100, allow_inf_nan=False)
    sigma: float = Field(0.1, gt=0, le=10, allow_inf_nan=False)
    n_clusters: int | None = Field(None, ge=2, le=100)
    max_iter_harmony: int = Field(10, ge=1, le=50)
    max_iter_kmeans: int = Field(4, ge=1, le=50)


class HarmonizationSpec(_Frozen):
    """Feature harmonization beyond ComBat, which the ``covariates`` section configures."""
    covbat: CovbatSpec | None = Field(
        None, description="CovBat's rounds after ComBat's; absent = ComBat alone.")
    embeddings: EmbeddingHarmonySpec | None = Field(
        None, description="Federated Harmony on the CNN's embeddings after the CNN phase; "
        "absent = none. Needs the cnn section.")


class IngestionSpec(_Frozen):
    """Which mask label is the ROI, and the per-case quality checks."""
    roi_label: int = Field(1, ge=1, le=65535, description="Mask value of the region of interest.")
    rtstruct_roi: str | None = Field(
        None, description="ROI name in RTSTRUCT masks (a manifest 'roi' column overrides it)."
    )
    min_roi_voxels: int = Field(10, ge=1, le=10_000_000,
                                description="Smallest usable ROI, in voxels.")
    geometry_tolerance: float = Field(
        1e-3,
        gt=0,
        lt=1,
        description="Image/mask geometry must agree within this fraction of a voxel spacing "
        "(origin, spacing) and this absolute difference of direction cosines.",
    )
    non_finite: Literal["skip", "mask"] = Field(
        "skip", description="An image holding NaN or infinite voxels: skip the case "
        "(non_finite_voxels), or leave those voxels out of every label (the ROI and the "
        "reference tissue) and give them the image's median, so no filter reads them.")


class ResampleSpec(_Frozen):
    """IBSI resampling: grid centres aligned, interpolation per protocol.
    ``spacing_mm`` is (x, y, z). With ``in_plane_only`` the slice spacing is kept (IBSI 2D configs)
    and the z value is ignored.
    """
    spacing_mm: tuple[Millimetres, Millimetres, Millimetres]
    in_plane_only: bool = False
    interpolation: Literal["nearest", "linear", "bspline"] = "linear"
    mask_interpolation: Literal["nearest", "linear"] = "linear"
    mask_threshold: float = Field(0.5, gt=0, le=1)


class NormalizationSpec(_Frozen):
    """MRI intensity normalization.
    * ``zscore``: (x - mean) / sd over the body foreground (Otsu), times ``scale``.
    * ``percentile``: the ``percentiles`` of the foreground mapped to 0 and ``scale``.
    * ``reference_tissue``: x / median(reference tissue) times ``scale``; the reference tissue is
      ``reference_label`` in the mask (e.g. paraspinal muscle), as MM MRI studies do. With an
      RTSTRUCT or DICOM SEG mask, the ROI / segment named ``reference_roi`` is read as that label.
    """
    method: Literal["zscore", "percentile", "reference_tissue"]
    scale: float = Field(100.0, gt=0, le=1e6, allow_inf_nan=False)
    percentiles: tuple[Finite, Finite] = (1.0, 99.0)
    reference_label: int | None = Field(None, ge=1, le=65535)
    reference_roi: str | None = Field(
        None, description="RTSTRUCT ROI name or SEG segment of the reference tissue (DICOM masks)."
    )

    @model_validator(mode="after")
    def _check(self) -> NormalizationSpec:
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError("'percentiles' must be [low, high] with 0 <= low < high <= 100")
        if self.method == "reference_tissue" and self.reference_label is None:
            raise ValueError("reference_tissue normalization needs 'reference_label'")
        if self.reference_roi is not None and self.method != "reference_tissue":
            raise ValueError("'reference_roi' only applies to reference_tissue normalization")
        return self


class BiasCorrectionSpec(_Frozen):
    """N4 bias-field correction (SimpleITK), fitted on a shrunken image for speed.
    ``iterations`` gives the maximum iterations per fitting level (its length = the levels)."""
    shrink_factor: int = Field(4, ge=1, le=8)
    iterations: tuple[Annotated[int, Field(ge=1, le=1000)], ...] = Field(
        (50, 50, 30), min_length=1, max_length=6)


class HistogramSpec(_Frozen):
    """Federated histogram standardization (Nyul-Udupa, MR), after N4 and normalization: each
    image's intensity percentiles inside the body (1st, quartiles, deciles, 99th) are mapped
    piecewise linearly onto the study's standard landmarks, the mean of every site's training
    images' landmarks (:mod:`harmonization.images`). It undoes a scanner's non-linear intensity
    response, which per-feature harmonization cannot. ``scale`` is where the 99th percentile
    lands on the standard scale (0 for the 1st): set it so that the radiomics bin width keeps
    its meaning (e.g. 250 after reference-tissue normalization to 100, where fat's 99th
    percentile lies near 250)."""
    scale: float = Field(100.0, gt=0, le=1e6, allow_inf_nan=False)


class MatchingSpec(_Frozen):
    """Federated acquisition matching, after histogram standardization and before resampling:
    the sites send per scanner the mean voxel spacing and noise level of their training images
    (in the same round as the landmarks); every image is then smoothed to the coarsest scanner's
    resolution (``resolution``: a Gaussian, each voxel taken to resolve like a Gaussian of FWHM
    its spacing) and gets seeded Gaussian noise up to the noisiest scanner's mean level
    (``noise``), so that no image has to gain detail it never had. It needs ``histogram``."""
    noise: bool = True
    resolution: bool = True

    @model_validator(mode="after")
    def _check(self) -> MatchingSpec:
        if not (self.noise or self.resolution):
            raise ValueError("match at least one of 'noise' and 'resolution' (or leave "
                             "'matching' out)")
        return self


class StandardizationSpec(_Frozen):
    """Image standardization, applied in the IBSI order: SUV (PET), N4 and intensity
    normalization (MR), histogram standardization (MR), acquisition matching, resampling with
    CT rounding, re-segmentation range, outlier filtering."""
    resample: ResampleSpec | None = None
    bias_correction: BiasCorrectionSpec | None = None
    normalization: NormalizationSpec | None = None
    histogram: HistogramSpec | None = Field(
        None, description="Federated Nyul-Udupa histogram standardization (MR); absent = off.")
    matching: MatchingSpec | None = Field(
        None, description="Federated resolution and noise matching (needs 'histogram'); "
                          "absent = off.")
    suv: bool = Field(True, description="PET: convert DICOM activity to SUV (body weight).")
    resegmentation_range: tuple[float, float] | None = Field(
        None,
        description="Keep ROI voxels in [low, high] (HU for CT, SUV for PET); -inf / inf = open.",
    )
    outlier_sigma: float | None = Field(
        None, ge=0.5, le=10, allow_inf_nan=False,
        description="Then drop ROI voxels beyond mean +/- this many SD (IBSI: 3).")

    def without_study_standard(self) -> StandardizationSpec:
        """These steps less the ones that need the study's image standard (histogram
        standardization and acquisition matching): what a site can run on its own."""
        return self.model_copy(update={"histogram": None, "matching": None})

    @model_validator(mode="after")
    def _check(self) -> StandardizationSpec:
        if self.matching is not None and self.histogram is None:
            raise ValueError("'matching' needs 'histogram': the acquisition is measured in the "
                             "histogram standardization round")
        rng = self.resegmentation_range
        if rng is not None:
            if not rng[0] < rng[1]:
                raise ValueError("'resegmentation_range' must be [low, high] with low < high")
            if math.isinf(rng[0]) and math.isinf(rng[1]):
                raise ValueError("'resegmentation_range' needs at least one finite bound")
        return self


class ImageTypesSpec(_Frozen):
    """pyradiomics image types: the original image and optional filtered ones."""
    original: bool = True
    log_sigma_mm: tuple[Annotated[float, Field(ge=0.1, le=20, allow_inf_nan=False)], ...] = Field(
        (), max_length=10)
    wavelet: bool = False

    @model_validator(mode="after")
    def _check(self) -> ImageTypesSpec:
        if not (self.original or self.log_sigma_mm or self.wavelet):
            raise ValueError("enable at least one image type")
        return self


def _all_feature_classes() -> dict[str, tuple[str, ...]]:
    """Every pyradiomics feature class, each with all its features (an empty tuple)."""
    return {
        name: () for name in ("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
    }


class RadiomicsSpec(_Frozen):
    """Feature extraction settings, handed to pyradiomics after the project's standardization.
    Discretization ``fixed_bin_size`` follows IBSI: the first bin starts at the lower
    re-segmentation bound (or the ROI minimum when there is none) for the original image.
    ``feature_classes`` maps a pyradiomics class (or ``ibsi``) to the features to compute
    (empty = all).

    Texture follows IBSI's aggregation methods. Dimension: 3D (default), 2.5D (``force_2d``:
    in-plane neighbours, every slice's matrix merged) or 2D (``force_2d`` and ``per_slice``:
    features of each slice, averaged over slices). ``texture_aggregation`` for the directional
    matrices (GLCM, GLRLM): ``averaged`` (features per direction, then averaged: pyradiomics'
    default, IBSI ``_avg``) or ``merged`` (matrices of every direction summed first, IBSI
    ``_comb``). The ``ibsi`` class's intensity-volume histogram has its own discretization
    (IBSI sets it apart from texture's): ``none`` (the intensities), ``fixed_bin_size``
    (``ivh_bin_width``) or ``fixed_bin_number`` (``ivh_bin_count``).
    """
    image_types: ImageTypesSpec = ImageTypesSpec()
    feature_classes: dict[str, tuple[str, ...]] = Field(default_factory=_all_feature_classes)
    discretization: Literal["fixed_bin_size", "fixed_bin_number"] = "fixed_bin_size"
    bin_width: float | None = Field(25.0, gt=0, le=1e6, allow_inf_nan=False)
    bin_count: int | None = Field(None, ge=2, le=MAX_BINS)
    force_2d: bool = False
    per_slice: bool = False
    texture_aggregation: Literal["averaged", "merged"] = "averaged"
    ivh_discretization: Literal["none", "fixed_bin_size", "fixed_bin_number"] = "none"
    ivh_bin_width: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False)
    ivh_bin_count: int | None = Field(None, ge=2, le=MAX_BINS)
    glcm_distances: tuple[Annotated[int, Field(ge=1, le=10)], ...] = (1,)
    gldm_alpha: int = Field(0, ge=0, le=MAX_BINS)

    @model_validator(mode="after")
    def _check(self) -> RadiomicsSpec:
        unknown = set(self.feature_classes) - set(FEATURE_CLASSES)
        if unknown:
            raise ValueError(
                f"unknown feature classes {sorted(unknown)}; known: {', '.join(FEATURE_CLASSES)}"
            )
        if not self.feature_classes:
            raise ValueError("enable at least one feature class")
        for name, features in self.feature_classes.items():
            wrong = sorted(set(features) - FEATURE_NAMES[name])
            if wrong:
                source = "the project's IBSI class" if name == "ibsi" else "pyradiomics"
                raise ValueError(f"feature_classes.{name}: no feature {wrong} in {source}; "
                                 f"known: {', '.join(sorted(FEATURE_NAMES[name]))}")
        if self.discretization == "fixed_bin_size" and self.bin_width is None:
            raise ValueError("fixed_bin_size discretization needs 'bin_width'")
        if self.discretization == "fixed_bin_number" and self.bin_count is None:
            raise ValueError("fixed_bin_number discretization needs 'bin_count'")
        if "shape2D" in self.feature_classes and not self.force_2d:
            raise ValueError("the 'shape2D' class needs force_2d = true")
        if self.ivh_discretization == "fixed_bin_size" and self.ivh_bin_width is None:
            raise ValueError("ivh_discretization fixed_bin_size needs 'ivh_bin_width'")
        if self.ivh_discretization == "fixed_bin_number" and self.ivh_bin_count is None:
            raise ValueError("ivh_discretization fixed_bin_number needs 'ivh_bin_count'")
        if self.per_slice and not self.force_2d:
            raise ValueError("per_slice (IBSI 2D) needs force_2d = true")
        if "ibsi" in self.feature_classes and not self.image_types.original:
            raise ValueError("the 'ibsi' class is computed on the original image: set "
                             "image_types.original = true")
        return self

    @property
    def dimension(self) -> Literal["3D", "2.5D", "2D"]:
        """IBSI's texture dimension: 2D (per slice), 2.5D (slices merged) or 3D."""
        return "2D" if self.per_slice else "2.5D" if self.force_2d else "3D"


class ModelSpec(_Frozen):
    """The radiomics model (phase 4), fitted federatedly on the training rows.
    Univariate screening keeps the ``screening_top_k`` features with the largest pooled Welch t
    (classification), |Pearson r| (regression) or Cox score statistic (survival); then a
    penalized GLM (logistic or linear) or Cox model stratified by site on the
    pooled-standardized features, its penalty chosen by federated ``cv_folds``-fold
    cross-validation over ``n_lambdas`` values (``lambda_rule``: the minimum CV loss, or the
    largest penalty within one standard error of it). ``clinical`` names covariates combined with
    the radiomics score in the nomogram (e.g. ``iss_stage``; classification and survival);
    empty = no nomogram.
    ``clinical_ranges`` gives a continuous clinical factor's axis on the nomogram plot (e.g.
    ``age: [40, 90]``; absent = 0 to 100).
    """
    screening_top_k: int = Field(30, ge=1, le=1000)
    penalty: Literal["lasso", "ridge"] = "lasso"
    cv_folds: int = Field(5, ge=2, le=10)
    n_lambdas: int = Field(10, ge=2, le=50)
    lambda_rule: Literal["min", "1se"] = "min"
    clinical: tuple[str, ...] = ()
    clinical_ranges: dict[str, tuple[Finite, Finite]] = Field(default_factory=dict)


class ValidationSpec(_Frozen):
    """How each site validates the models on its test rows (``common.metrics``).
    ``min_count``: the fewest patients in any group a curve a site sends tells apart: a
    calibration bin, or the patients between two thresholds of the decision curve (a site
    withholds the model's net benefit, NaN, at thresholds that would split off fewer); a test
    set smaller than it sends no calibration curve. ``n_bins``: the most calibration bins.
    ``bootstrap``: resamples of the stratified bootstrap CI of the AUC (0 = DeLong's CI only).
    ``decision_thresholds``: the threshold probabilities of the decision curve.
    ``site_update`` (default on): each site also scores the federated radiomics model updated
    on its own training rows (recalibrated, revised towards its coefficients, or the site's
    local model, whichever its cross-validation prefers: :mod:`common.selection.updating`);
    that model never leaves the site.
    ``repeats``: 1 (default) validates on one seeded split, ``test_fraction`` held out; K of 3
    to 10 runs the radiomics models K times, on the K splits of a cross-validation whose folds
    are made of privacy atoms (:func:`client.folds.outer_folds`): each fold is the test set
    once, and the others are the model's cross-validation folds (so ``model.cv_folds`` must be
    K - 1). The report shows each model's mean metric per site over the splits, with its
    spread. The image standard, the segmentation network and the CNN use the first split.
    Survival only: ``times`` (months) where the time-dependent AUC, the Brier score and the
    calibration are reported (Uno's C is truncated at the last), ``km_grid`` (months) where the
    Kaplan-Meier curves by predicted risk group are reported (a fixed grid: never a step at one
    patient's time). ``bootstrap`` also sets the resamples of the C indices' CIs.
    """
    site_update: bool = True
    repeats: int = Field(1, ge=1, le=10)
    min_count: int = Field(5, ge=1, le=1000)
    n_bins: int = Field(10, ge=2, le=50)
    bootstrap: int = Field(1000, ge=0, le=100_000)
    decision_thresholds: tuple[Annotated[float, Field(gt=0, lt=1)], ...] = (
        0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8,
        0.85, 0.9, 0.95)
    times: tuple[Annotated[float, Field(gt=0, le=1200)], ...] = Field(
        (12.0, 24.0, 36.0), min_length=1, max_length=20)
    km_grid: tuple[Annotated[float, Field(ge=0, le=1200)], ...] = Field(
        tuple(float(m) for m in range(0, 61, 6)), min_length=2, max_length=200)

    @model_validator(mode="after")
    def _check(self) -> ValidationSpec:
        for name in ("times", "km_grid"):
            values = getattr(self, name)
            if list(values) != sorted(set(values)):
                raise ValueError(f"validation.{name} must increase")
        return self


class LocalDpSpec(_Frozen):
    """Local differential privacy on a site's CNN updates (optional): each round the site clips
    its update (trained weights minus the global weights it received, all float weights as one
    vector) to L2 norm ``clipping_norm`` and adds Gaussian noise of standard deviation
    2 x clipping_norm x sqrt(2 ln(1.25 / delta)) / epsilon to every float weight before it
    leaves. Sensitivity 2 x clipping_norm covers any change of the site's data, so each round is
    (epsilon, delta)-DP for the site (the classical Gaussian mechanism; epsilon at most 1), and
    R rounds are (R epsilon, R delta)-DP by basic composition. Expect a cost in accuracy: the
    noise is added to every weight."""
    epsilon: float = Field(gt=0, le=1)
    delta: float = Field(1e-5, gt=0, lt=1)
    clipping_norm: float = Field(1.0, gt=0, le=1e6, allow_inf_nan=False)

    @property
    def noise_std(self) -> float:
        return 2 * self.clipping_norm * math.sqrt(2 * math.log(1.25 / self.delta)) / self.epsilon


#: A CNN crop's edge, in voxels.
CropEdge = Annotated[int, Field(ge=8, le=256)]


class FederatedTrainingSpec(_Frozen):
    """What a network's federated training shares, the CNN's and the segmentation network's:
    ``local_epochs`` a round at each site, Adam's ``learning_rate``, the ``aggregator`` (one of
    Flower's strategies: ``proximal_mu`` is FedProx's; ``trim_fraction`` the trimmed mean's;
    ``krum_byzantine`` the number of bad sites Krum tolerates) and the training augmentation."""
    local_epochs: int = Field(1, ge=1, le=100)
    learning_rate: float = Field(1e-3, gt=0, le=10, allow_inf_nan=False)
    aggregator: Literal["fedavg", "fedprox", "fedadam", "fedmedian", "trimmed_mean", "krum"] = (
        "fedavg")
    proximal_mu: float = Field(0.01, ge=0, le=100, allow_inf_nan=False)
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)
    krum_byzantine: int = Field(0, ge=0, le=100)
    augment: bool = True


class CnnSpec(FederatedTrainingSpec):
    """The 3D CNN (phase 5): a MONAI network on ROI-centred crops, trained over ``rounds``
    federated rounds with the named aggregator (``proximal_mu`` is FedProx's; ``trim_fraction``
    the trimmed mean's; ``krum_byzantine`` the number of bad sites Krum tolerates; ``local_dp``
    noises each site's update, see :class:`LocalDpSpec`; ``local_baseline`` scores a local-only
    network at each site, ``leave_site_out`` one trained without it; ``local_norm`` keeps the
    normalization layers at the sites, FedBN; ``fine_tune_epochs`` a final local fine-tuning at
    each site; ``transfer`` the weights' precision on the wire).
    DenseNet121 needs a crop of at least 29 voxels on every axis."""
    architecture: Literal["resnet10", "resnet18", "densenet121"] = "resnet10"
    width: float = Field(0.25, gt=0, le=4, description="ResNet channel multiplier (1 = MONAI's "
                         "64-512 channels; 0.25 = 16-128, 1/16 of the weights).")
    crop_size: tuple[CropEdge, CropEdge, CropEdge] = Field(
        (48, 48, 16), description="(x, y, z) voxels.")
    rounds: int = Field(5, ge=1, le=500)
    batch_size: int = Field(8, ge=1, le=1024)
    local_dp: LocalDpSpec | None = None
    local_baseline: bool = Field(
        True, description="Each site also trains the network on its own crops alone (the same "
        "rounds and local epochs, from the same initial network) and scores it on its test "
        "crops: the CNN's local-only row beside the federated one; only its metrics leave.")
    leave_site_out: bool = Field(
        False, description="Also one federation per site without it (the same rounds, the "
        "other sites), its final model scored at the left-out site: the CNN's leave-one-site-out "
        "external validation, at the cost of one more federation per site.")
    local_norm: bool = Field(
        False, description="FedBN: the normalization layers (BatchNorm weights, biases and "
        "running statistics) stay at each site, never sent, never averaged; each site scores the "
        "global model with its own.")
    fine_tune_epochs: int = Field(
        0, ge=0, le=100, description="A final local fine-tuning: each site trains the final "
        "global model (with FedBN, with its own normalization layers) this many more epochs on "
        "its own training crops, scores it on its test crops beside the global model and keeps "
        "it, and chooses between the two by their loss on a held-out quarter of its training "
        "crops (fine-tuned on the other three); only metrics leave. 0: none.")
    transfer: Literal["float32", "float16"] = Field(
        "float32", description="The float weights' precision on the wire in the training "
        "rounds, both ways: float16 halves the bytes of a round; the server averages and keeps "
        "the global model in float32, the sites train in float32.")

    @property
    def embedding_width(self) -> int:
        """How many features enter the network's last linear layer (its embeddings):
        MONAI's ResNet ends with ``512 * width`` channels, DenseNet121 with 1024."""
        if self.architecture == "densenet121":
            return 1024
        return int(512 * self.width)

    @model_validator(mode="after")
    def _check(self) -> CnnSpec:
        if self.leave_site_out and self.local_norm:
            raise ValueError("leave_site_out with local_norm (FedBN): a left-out site has no "
                             "normalization layers of its own for the model trained without it")
        if self.architecture == "densenet121" and min(self.crop_size) < 29:
            raise ValueError(f"densenet121 needs a crop of at least 29 voxels on every axis, "
                             f"got {list(self.crop_size)}")
        return self


class SegmentationSpec(FederatedTrainingSpec):
    """The segmentation network (issue 17): a MONAI 3D network that labels the ROI
    (``ingestion.roi_label``) and, where the protocol normalizes by it, the reference tissue
    (``normalization.reference_label``), so that a case without a hand-drawn mask can join.

    Its input needs no mask: the image resampled to ``spacing_mm`` (x, y, z; ``None``: the
    protocol's resampling spacing, with its ``in_plane_only``) and its intensities scaled without
    one (:mod:`client.segment.inputs`). Training samples ``patches_per_case`` patches of
    ``patch_size`` (x, y, z voxels) a case and epoch, balanced between the labels, with flips,
    small rotations and intensity/contrast changes (``augment``); MONAI's Dice + cross-entropy
    loss; inference slides the patch over the whole image. ``dynunet`` is MONAI's DynUNet in
    nnU-Net's configuration (kernels and strides from the spacing); ``unet`` and ``segresnet``
    MONAI's UNet and SegResNet, ``channels`` their feature maps per level. Its federated
    training settings are the CNN's (:class:`FederatedTrainingSpec`).

    Quality control of a mask the network makes: a label whose volume lies outside the range
    of the training masks widened by ``volume_margin`` (a share of it, each side), or whose
    voxels lie for more than ``max_fragment_share`` outside its largest components (as many as
    the training masks had), is named and the case not used.
    ``leave_site_out``: one more federation per site, without it, scored on its test masks."""
    architecture: Literal["unet", "dynunet", "segresnet"] = "unet"
    channels: tuple[int, ...] = Field((8, 16, 32, 64), min_length=2, max_length=6)
    spacing_mm: tuple[Millimetres, Millimetres, Millimetres] | None = None
    patch_size: tuple[CropEdge, CropEdge, CropEdge] = Field(
        (64, 64, 16), description="(x, y, z) voxels; each a multiple of 2^(levels - 1).")
    rounds: int = Field(10, ge=1, le=500)
    patches_per_case: int = Field(4, ge=1, le=64)
    batch_size: int = Field(4, ge=1, le=256)
    leave_site_out: bool = Field(
        False, description="Also one federation per site without it (the same rounds, the "
        "other sites), scored on the left-out site's held-out masks: the segmentation's "
        "leave-one-site-out Dice, at the cost of one more federation per site.")
    volume_margin: float = Field(0.5, ge=0, le=10, allow_inf_nan=False)
    max_fragment_share: float = Field(0.1, gt=0, le=1, allow_inf_nan=False)

    @property
    def levels(self) -> int:
        """Resolution levels of the network (one per entry of ``channels``)."""
        return len(self.channels)

    @model_validator(mode="after")
    def _check(self) -> SegmentationSpec:
        step = 2 ** (self.levels - 1)
        bad = [edge for edge in self.patch_size if edge % step]
        if bad:
            raise ValueError(f"patch_size {list(self.patch_size)}: every edge must be a multiple "
                             f"of {step} (2^(levels - 1) for {self.levels} levels of channels)")
        if any(c < 1 or c > 512 for c in self.channels):
            raise ValueError("channels: each level has 1 to 512 feature maps")
        return self


class StudyProtocol(_Frozen):
    """The whole study protocol. Unknown fields are refused (a typo is an error, not a default)."""
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1)
    description: str = ""
    modality: Modality
    task: TaskSpec
    covariates: CovariateSpec = CovariateSpec()
    batch_column: str | None = Field(
        "scanner",
        description="Manifest column naming the scanner (ComBat batch); absent column = one batch "
        "per site.",
    )
    harmonization: HarmonizationSpec = HarmonizationSpec()
    ingestion: IngestionSpec = IngestionSpec()
    standardization: StandardizationSpec = StandardizationSpec()
    radiomics: RadiomicsSpec = RadiomicsSpec()
    model: ModelSpec = ModelSpec()
    validation: ValidationSpec = ValidationSpec()
    cnn: CnnSpec | None = Field(None, description="The CNN phase; absent = radiomics only.")
    segmentation: SegmentationSpec | None = Field(
        None, description="The segmentation network; absent = every case brings its mask.")

    @field_validator("batch_column", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        # TOML has no null: an empty string means "no batch column".
        return None if value == "" else value

    @model_validator(mode="after")
    def _check(self) -> StudyProtocol:
        std = self.standardization
        if self.modality is not Modality.MR:
            if std.bias_correction is not None:
                raise ValueError("bias_correction (N4) is for MR protocols only")
            if std.normalization is not None:
                raise ValueError("normalization is for MR protocols only")
            if std.histogram is not None:
                raise ValueError("histogram standardization is for MR protocols only")
        if std.normalization is not None and std.normalization.reference_label is not None:
            if std.normalization.reference_label == self.ingestion.roi_label:
                raise ValueError(
                    "normalization.reference_label must differ from ingestion.roi_label")
        reserved = {self.task.label_column, self.task.event_column, self.batch_column, "case_id",
                    "image", "mask", "mask_source"}
        clash = set(self.covariates.columns) & reserved
        if clash:
            raise ValueError(f"covariate columns clash with reserved columns: {sorted(clash)}")
        unknown = set(self.model.clinical) - set(self.covariates.columns)
        if unknown:
            raise ValueError(f"model.clinical names {sorted(unknown)}, which are not covariates: "
                             "declare them under [covariates]")
        if self.task.kind is TaskKind.SURVIVAL:
            # what issue 18 has not built yet is refused by name, not skipped in silence
            if self.cnn is not None:
                raise ValueError("cnn: the CNN does not train on survival times yet; leave "
                                 "the cnn phase out of a survival task")
        if self.harmonization.embeddings is not None and self.cnn is None:
            raise ValueError("harmonization.embeddings harmonizes the CNN's embeddings: the "
                             "protocol needs a cnn section")
        repeats = self.validation.repeats
        if repeats == 2:
            raise ValueError("validation.repeats: 2 splits leave one fold to choose the model's "
                             "penalty on; use 1 (one split) or 3 to 10")
        if repeats > 1 and self.model.cv_folds != repeats - 1:
            raise ValueError(f"validation.repeats = {repeats}: the model's cross-validation "
                             "folds are the other splits' test folds, so model.cv_folds must be "
                             f"{repeats - 1}")
        for column, (low, high) in self.model.clinical_ranges.items():
            if column not in self.model.clinical or column not in self.covariates.continuous:
                raise ValueError(f"model.clinical_ranges names '{column}', which is not a "
                                 "continuous clinical factor of model.clinical")
            if not low < high:
                raise ValueError(f"model.clinical_ranges.{column}: low must be below high")
        return self

    @property
    def protects_outcome(self) -> bool:
        """Whether ComBat protects the label as a covariate of its estimation: with
        ``covariates.protect_outcome``, for classification and regression (a survival task's
        censored time is no covariate to protect)."""
        return self.covariates.protect_outcome and self.task.kind is not TaskKind.SURVIVAL

    def content_hash(self) -> str:
        """SHA-256 of the canonical JSON form: equal protocols give equal hashes everywhere."""
        canonical = json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def short_hash(self) -> str:
        return self.content_hash()[:12]


#: A configuration file's largest size and deepest nesting: a protocol or site config is a few
#: kB and a few levels deep; the parsers recurse per level (a file nested 20,000 deep overflowed
#: Python's stack).
MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_DEPTH = 32


class _DepthLimitedLoader(yaml.SafeLoader):  # type: ignore[misc]
    """PyYAML's safe loader, refusing documents nested deeper than :data:`MAX_CONFIG_DEPTH`."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_CONFIG_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _nesting(text: str) -> int:
    """The deepest bracket nesting of a TOML text (arrays and inline tables), strings aside
    only roughly: enough to refuse a file before ``tomllib`` recurses through it."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(depth - 1, 0)
    return deepest


def read_mapping(path: Path) -> dict[str, Any]:
    """Read a TOML or YAML file into a dict, or raise :class:`ConfigError` naming the file."""
    if not path.is_file():
        raise ConfigError(str(path), ["file not found"])
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(str(path), [f"larger than {MAX_CONFIG_BYTES:,} bytes: not a "
                                      "configuration file"])
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".toml":
            if _nesting(text) > MAX_CONFIG_DEPTH:
                raise ConfigError(str(path), [f"cannot parse: nested deeper than "
                                              f"{MAX_CONFIG_DEPTH} levels"])
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_DepthLimitedLoader)  # noqa: S506 - a safe loader
        else:
            raise ConfigError(str(path), [f"unknown format '{suffix}': use .toml, .yaml or .yml"])
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"cannot parse: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["top level must be a table/mapping"])
    return data


def validation_problems(exc: ValidationError) -> list[str]:
    """Turn a pydantic error into lines of 'dotted.field: reason'."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {msg}")
    return problems


def protocol_from_mapping(data: dict[str, Any], source: str = "protocol") -> StudyProtocol:
    try:
        return StudyProtocol.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, validation_problems(exc)) from None


def load_protocol(path: Path | str) -> StudyProtocol:
    """Load and validate a study protocol from a ``.toml``, ``.yaml`` or ``.yml`` file, or from
    a preset name (``preset:spine_mri_t1w``; see :func:`common.presets.list_presets`)."""
    text = str(path)
    if text.startswith("preset:"):
        path = preset_path(text.removeprefix("preset:"))
    path = Path(path)
    return protocol_from_mapping(read_mapping(path), source=str(path))
