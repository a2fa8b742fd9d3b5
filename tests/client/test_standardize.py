from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk

from client.extract import _binning_classes, _IbsiFixedBinSize
from client.standardize import (
    BiasFieldCorrection,
    HistogramStandardize,
    MatchAcquisition,
    Normalize,
    Resample,
    Resegment,
    Volume,
    body_mask,
    build_steps,
    ibsi_grid,
    measure_image,
    standardize,
)
from common.errors import ConfigError
from common.protocol import (
    BiasCorrectionSpec,
    HistogramSpec,
    MatchingSpec,
    NormalizationSpec,
    ResampleSpec,
    StandardizationSpec,
    load_protocol,
)
from common.synthetic import default_sites, make_patients, render
from harmonization.images import MAPPED, PERCENTILES, ImageStandard, noise_level
from tests.conftest import make_volume


def _centre(size, origin, spacing, direction) -> np.ndarray:
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    half = (np.asarray(size) - 1) * np.asarray(spacing) / 2.0
    return np.asarray(origin) + d @ half


@pytest.mark.parametrize("seed", range(5))
def test_ibsi_grid_keeps_the_grid_centre(seed):
    rng = np.random.default_rng(seed)
    image = sitk.Image([int(n) for n in rng.integers(5, 60, 3)], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in rng.uniform(0.3, 5.0, 3)])
    image.SetOrigin([float(o) for o in rng.uniform(-200, 200, 3)])
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # an oblique direction
    image.SetDirection([float(v) for v in q.ravel()])
    target = tuple(float(s) for s in rng.uniform(0.5, 4.0, 3))

    size, origin, spacing = ibsi_grid(image, target, in_plane_only=False)

    expected_size = np.ceil(np.asarray(image.GetSize()) * image.GetSpacing() / np.asarray(target))
    assert tuple(size) == tuple(int(n) for n in expected_size)
    np.testing.assert_allclose(
        _centre(size, origin, spacing, image.GetDirection()),
        _centre(image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection()),
        atol=1e-9,
    )


def test_ibsi_grid_worked_example_and_in_plane_only():
    image = sitk.Image([10, 10, 7], sitk.sitkFloat32)
    image.SetSpacing([1.0, 1.0, 3.0])
    # 10 voxels of 1 mm -> ceil(10 / 0.7) = 15 voxels of 0.7 mm; origin moves by (9 - 9.8)/2.
    size, origin, spacing = ibsi_grid(image, (0.7, 0.7, 0.7), in_plane_only=False)
    assert size == (15, 15, 30)
    assert origin[0] == pytest.approx(-0.4)
    size, origin, spacing = ibsi_grid(image, (0.7, 0.7, 0.7), in_plane_only=True)
    assert size == (15, 15, 7) and spacing[2] == 3.0 and origin[2] == 0.0


def test_resample_to_same_grid_is_identity():
    image, labels = make_volume(spacing=(2.0, 2.0, 2.0))
    spec = ResampleSpec(spacing_mm=(2.0, 2.0, 2.0), interpolation="linear")
    out = Resample(spec, round_intensities=False)(Volume(image, labels, 1))
    np.testing.assert_allclose(sitk.GetArrayFromImage(out.image), sitk.GetArrayFromImage(image),
                               atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out.labels),
                                  sitk.GetArrayFromImage(labels))


def test_resample_rounds_ct_and_thresholds_mask_fraction():
    image, labels = make_volume(spacing=(1.0, 1.0, 2.0))
    spec = ResampleSpec(spacing_mm=(1.5, 1.5, 1.5), interpolation="bspline",
                        mask_interpolation="linear", mask_threshold=0.5)
    out = Resample(spec, round_intensities=True)(Volume(image, labels, 1))
    values = sitk.GetArrayFromImage(out.image)
    np.testing.assert_array_equal(values, np.round(values))
    # The mask is the >= 0.5 level set of the linearly interpolated ROI indicator.
    fraction = sitk.Resample(sitk.Cast(labels == 1, sitk.sitkFloat32), out.image,
                             sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)
    expected = sitk.GetArrayFromImage(fraction) >= 0.5
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out.labels) == 1, expected)
    # The physical ROI volume is preserved to within the partial-volume rounding.
    before = (sitk.GetArrayFromImage(labels) == 1).sum() * np.prod(labels.GetSpacing())
    after = expected.sum() * np.prod(out.labels.GetSpacing())
    assert after == pytest.approx(before, rel=0.1)


def test_resegment_changes_only_the_intensity_mask():
    image, labels = make_volume(seed=3)
    volume = Volume(image, labels, 1)
    out = Resegment((120.0, np.inf), outlier_sigma=2.0)(volume)
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    roi = sitk.GetArrayFromImage(labels) == 1
    in_range = roi & (values >= 120.0)
    mean, sd = values[in_range].mean(), values[in_range].std()
    expected = in_range & (np.abs(values - mean) <= 2.0 * sd)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out.intensity_roi).astype(bool), expected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out.morphological_roi()).astype(bool), roi)
    assert 0 < expected.sum() < roi.sum()


def test_reference_tissue_normalization_puts_muscle_at_scale():
    image, labels = make_volume(seed=1)
    out = Normalize(NormalizationSpec(method="reference_tissue", reference_label=2,
                                      scale=100.0))(Volume(image, labels, 1))
    muscle = sitk.GetArrayFromImage(out.image)[sitk.GetArrayFromImage(labels) == 2]
    assert np.median(muscle) == pytest.approx(100.0, rel=1e-5)


def test_zscore_and_percentile_normalization():
    image, labels = make_volume(seed=2)
    z = Normalize(NormalizationSpec(method="zscore", scale=1.0))(Volume(image, labels, 1))
    p = Normalize(NormalizationSpec(method="percentile", percentiles=(1, 99), scale=100.0))(
        Volume(image, labels, 1))
    zv, pv = sitk.GetArrayFromImage(z.image), sitk.GetArrayFromImage(p.image)
    body = sitk.GetArrayFromImage(sitk.OtsuThreshold(image, 0, 1, 200)).astype(bool)
    # Statistics are taken over the body foreground (Otsu), not the whole field of view.
    assert float(zv[body].mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(zv[body].std()) == pytest.approx(1.0, rel=1e-4)
    lo, hi = np.percentile(pv[body], [1, 99])
    assert lo == pytest.approx(0.0, abs=1e-3) and hi == pytest.approx(100.0, rel=1e-4)


def test_n4_removes_a_smooth_bias_field():
    rng = np.random.default_rng(0)
    shape = (16, 48, 48)
    tissue = np.full(shape, 200.0) + rng.normal(0, 2.0, shape)
    tissue[:, :4, :] = 1.0  # some background
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    bias = np.exp(0.35 * xx + 0.2 * yy)
    image = sitk.GetImageFromArray((tissue * bias).astype(np.float32))
    labels = sitk.GetImageFromArray(np.ones(shape, np.uint8))
    out = BiasFieldCorrection(BiasCorrectionSpec(shrink_factor=2))(Volume(image, labels, 1))
    region = (slice(None), slice(8, None), slice(None))

    def cov(a: np.ndarray) -> float:
        return float(a[region].std() / a[region].mean())

    assert cov(sitk.GetArrayFromImage(out.image)) < 0.5 * cov(tissue * bias)


def test_ibsi_fixed_bin_size_starts_at_the_lower_resegmentation_bound():
    # ROI intensities 60..200 HU with re-segmentation [-1000, 400], bin width 25: IBSI bins are
    # floor((x + 1000) / 25) + 1 (so 60 HU is bin 43), whatever the ROI minimum.
    values = np.array([[[60.0, 85.0, 110.0, 200.0, 137.0]]], dtype=np.float32)
    image = sitk.GetImageFromArray(values)
    mask = sitk.GetImageFromArray(np.ones(values.shape, np.uint8))
    cls = _binning_classes(_IbsiFixedBinSize)["firstorder"]
    fo = cls(image, mask, binWidth=25.0, ibsiLowerBound=-1000.0, label=1)
    expected = np.floor((values + 1000.0) / 25.0).astype(int) + 1
    np.testing.assert_array_equal(fo.discretizedImageArray, expected)
    # pyradiomics' own rule would start at 50 HU (bin 1), which IBSI does not.
    from radiomics.firstorder import RadiomicsFirstOrder

    plain = RadiomicsFirstOrder(image, mask, binWidth=25.0, label=1)
    assert plain.discretizedImageArray.min() == 1 != expected.min()


def test_build_steps_follows_the_protocol_order():
    preset = load_protocol("preset:spine_mri_t1w")
    plain = preset.model_copy(
        update={"standardization": preset.standardization.without_study_standard()})
    assert [type(s).__name__ for s in build_steps(plain)] == [
        "BiasFieldCorrection", "Normalize", "Resample", "Resegment"]
    protocol = preset.model_copy(update={"standardization": preset.standardization.model_copy(
        update={"histogram": HistogramSpec(scale=250.0), "matching": None})})
    standard = ImageStandard(tuple(np.linspace(0.0, 250.0, len(PERCENTILES))), 250.0)
    steps = build_steps(protocol, standard=standard)
    assert [type(s).__name__ for s in steps] == [
        "BiasFieldCorrection", "Normalize", "HistogramStandardize", "Resample", "Resegment"]
    with pytest.raises(ConfigError, match="standard landmarks are missing"):
        build_steps(protocol)
    with pytest.raises(ConfigError, match="made for scale 100"):
        build_steps(protocol, standard=ImageStandard(standard.landmarks, 100.0))
    # the preset as shipped: resolution matching after the histogram mapping, noise left alone
    with pytest.raises(ConfigError, match="no acquisition target"):
        build_steps(preset, standard=standard)
    matched = build_steps(preset, standard=dataclasses.replace(
        standard, noise=2.0, spacing=(0.9, 0.9, 4.0)))
    assert [type(s).__name__ for s in matched] == [
        "BiasFieldCorrection", "Normalize", "HistogramStandardize", "MatchAcquisition",
        "Resample", "Resegment"]
    assert matched[3].record()["noise"] is None
    assert [type(s).__name__ for s in build_steps(load_protocol("preset:ibsi_digital_phantom"))] \
        == []
    for step in steps:
        assert step.record()["step"]


def test_standardize_reports_missing_reference_tissue():
    from common.errors import CaseError, SkipReason

    image, labels = make_volume()
    only_roi = sitk.Cast(labels == 1, sitk.sitkUInt8)
    steps = [Normalize(NormalizationSpec(method="reference_tissue", reference_label=2))]
    with pytest.raises(CaseError) as err:
        standardize(Volume(image, only_roi, 1), steps)
    assert err.value.reason is SkipReason.STANDARDIZATION_FAILED
    assert "label 2" in err.value.detail


def test_cropped_resampling_equals_the_full_grid_there():
    image, labels = make_volume(shape_zyx=(20, 40, 36), spacing=(0.8, 0.8, 2.5), seed=4)
    labels = sitk.Cast(labels == 1, sitk.sitkUInt8)  # the ROI only (no reference tissue)
    image.SetDirection([0, 1, 0, -1, 0, 0, 0, 0, 1])  # a rotated frame
    labels.SetDirection(image.GetDirection())
    spec = ResampleSpec(spacing_mm=(1.1, 1.1, 1.1), interpolation="bspline")
    full = Resample(spec, round_intensities=True)(Volume(image, labels, 1))
    crop = Resample(spec, round_intensities=True, margin_voxels=3)(Volume(image, labels, 1))
    assert np.prod(crop.image.GetSize()) < 0.6 * np.prod(full.image.GetSize())
    # Locate the cropped block inside the full grid by its origin.
    offset = np.rint(np.asarray(full.image.TransformPhysicalPointToContinuousIndex(
        crop.image.GetOrigin()))).astype(int)
    x, y, z = offset
    sx, sy, sz = crop.image.GetSize()
    block = (slice(z, z + sz), slice(y, y + sy), slice(x, x + sx))
    np.testing.assert_allclose(sitk.GetArrayFromImage(crop.image),
                               sitk.GetArrayFromImage(full.image)[block], atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(crop.labels),
                                  sitk.GetArrayFromImage(full.labels)[block])
    # every labelled voxel of the full grid is inside the crop
    assert (sitk.GetArrayFromImage(full.labels) != 0).sum() == \
        (sitk.GetArrayFromImage(crop.labels) != 0).sum()


def _phantom(scanner_index: int = 0):
    site = default_sites()[1]
    patient = make_patients(site, seed=0)[0]
    image, labels, _ = render(patient, site.scanners[scanner_index], "MR", seed=0)
    return Volume(sitk.Cast(image, sitk.sitkFloat32), labels, 1)


def test_the_body_mask_holds_every_tissue_not_only_the_bright_ones():
    volume = _phantom()
    body = body_mask(volume.image)
    labels = sitk.GetArrayFromImage(volume.labels)
    assert body[labels == 2].mean() > 0.99 and body[labels == 1].mean() > 0.99  # muscle, marrow
    otsu = sitk.GetArrayFromImage(sitk.OtsuThreshold(volume.image, 0, 1, 200)).astype(bool)
    assert body.sum() > 1.3 * otsu.sum()  # Otsu leaves out the darker soft tissue
    # the rest is air: the body's ellipse covers 69% of the field of view
    assert not body[:, :6, :6].any() and 0.6 < body.mean() < 0.8


def test_histogram_standardization_lands_the_image_on_the_standard_landmarks():
    volume = _phantom(scanner_index=0)  # B_Siemens_3T: gamma 0.8
    standard = ImageStandard(tuple(np.linspace(0.0, 250.0, len(PERCENTILES))), 250.0)
    step = HistogramStandardize(standard)
    out = step(volume)
    body = body_mask(volume.image)
    mapped = np.percentile(sitk.GetArrayFromImage(out.image)[body], PERCENTILES)[list(MAPPED)]
    # through the landmarks the mapping runs through (float32 rounding aside)
    np.testing.assert_allclose(mapped, np.asarray(standard.landmarks)[list(MAPPED)], atol=0.01)
    assert measure_image(volume, 250.0)[0][-1] == pytest.approx(250.0)
    assert step.record() == {"step": "histogram_standardization", "scale": 250.0,
                             "landmarks": list(standard.landmarks)}


def test_acquisition_matching_smooths_to_the_target_resolution_and_adds_noise_to_the_target():
    volume = _phantom(scanner_index=1)  # B_Siemens_1.5T: 0.75 x 0.75 x 3 mm, the quieter one
    landmarks, noise, spacing = measure_image(volume, 250.0)
    assert spacing == pytest.approx((0.75, 0.75, 3.0)) and noise > 0
    values = sitk.GetArrayFromImage(volume.image).astype(np.float64)
    body = body_mask(volume.image)
    own = noise_level(values, body)
    # the landmarks' units: the body's 1st to 99th percentile span 0 to 250
    low, high = np.percentile(values[body], [1.0, 99.0])
    assert noise == pytest.approx(own * 250.0 / (high - low))
    louder = MatchAcquisition(3.0 * own, None)(volume)
    after = sitk.GetArrayFromImage(louder.image).astype(np.float64)
    assert noise_level(after, body) == pytest.approx(3.0 * own, rel=0.1)
    assert np.array_equal(after, sitk.GetArrayFromImage(MatchAcquisition(3.0 * own, None)(
        volume).image))  # seeded by the image: the same case gets the same noise
    quieter = sitk.GetArrayFromImage(MatchAcquisition(0.5 * own, None)(volume).image)
    np.testing.assert_allclose(quieter, values, atol=1e-3)
    coarser = MatchAcquisition(None, (1.0, 1.0, 4.0))(volume)
    smoothed = sitk.GetArrayFromImage(coarser.image).astype(np.float64)
    assert noise_level(smoothed, body) < 0.9 * own  # smoothing lowers the noise, too
    assert coarser.image.GetSpacing() == volume.image.GetSpacing()  # the grid is kept
    same = MatchAcquisition(None, (0.5, 0.5, 2.0))(volume)  # already as coarse: unchanged
    np.testing.assert_allclose(sitk.GetArrayFromImage(same.image), values, atol=1e-3)
    assert MatchAcquisition(2.0, (1.0, 1.0, 4.0)).record() == {
        "step": "acquisition_matching", "noise": 2.0, "spacing_mm": [1.0, 1.0, 4.0]}


def test_matching_needs_histogram_standardization_and_the_targets():
    protocol = load_protocol("preset:spine_mri_t1w")
    std = protocol.standardization.model_dump()
    with pytest.raises(ValueError, match="'matching' needs 'histogram'"):
        StandardizationSpec.model_validate({**std, "histogram": None, "matching": {}})
    with pytest.raises(ValueError, match="at least one"):
        MatchingSpec(noise=False, resolution=False)
    matched = protocol.model_copy(update={"standardization": protocol.standardization.model_copy(
        update={"histogram": HistogramSpec(scale=250.0), "matching": MatchingSpec(noise=False)})})
    standard = ImageStandard(tuple(np.linspace(0.0, 250.0, len(PERCENTILES))), 250.0)
    with pytest.raises(ConfigError, match="no acquisition target"):
        build_steps(matched, standard=standard)
    steps = build_steps(matched, standard=ImageStandard(standard.landmarks, 250.0,
                                                        spacing=(1.0, 1.0, 4.0)))
    step = next(s for s in steps if isinstance(s, MatchAcquisition))
    assert step.noise is None and step.spacing == (1.0, 1.0, 4.0)  # noise not matched
