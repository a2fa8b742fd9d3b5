"""Federated histogram standardization equals TorchIO's on the pooled images; small scanners;
the image standard's JSON; the acquisition matching's noise level, smoothing and targets."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from common.errors import HarmonizationError
from harmonization.images import (
    FWHM_PER_SIGMA,
    PERCENTILES,
    ImageStandard,
    combine_image_sums,
    image_landmarks,
    noise_level,
    scanner_sums,
    smoothing_sigmas,
    standardize_histogram,
)
from tests.conftest import image_measure

tio = pytest.importorskip("torchio", reason="TorchIO is the reference (pip install torchio)")


def _images(seed: int = 0):
    """Images of three scanners with different gamma, scale and offset; a body mask each."""
    rng = np.random.default_rng(seed)
    out = []
    for scanner, gamma, scale, offset in (("s1", 1.0, 1.0, 0.0), ("s2", 0.8, 1.4, 30.0),
                                          ("s3", 1.2, 0.7, -10.0)):
        for _ in range(6):
            tissue = rng.choice([300.0, 620.0, 850.0], size=(12, 20, 20), p=[0.5, 0.2, 0.3])
            clean = np.abs(tissue + rng.normal(0, 40, tissue.shape))
            image = 1000.0 * (clean / 1000.0) ** gamma * scale + offset
            body = np.zeros(image.shape, bool)
            body[2:-2, 3:-3, 3:-3] = True
            image[~body] = rng.normal(5, 2, int((~body).sum()))
            out.append((scanner, image, body))
    return out


def _write(array: np.ndarray, path) -> str:
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.float32)), str(path))
    return str(path)


def test_federated_landmarks_equal_torchio_train_on_the_pooled_images(tmp_path):
    images = _images()
    paths = [_write(im, tmp_path / f"i{k}.nii.gz") for k, (_, im, _) in enumerate(images)]
    masks = [_write(b.astype(np.uint8), tmp_path / f"m{k}.nii.gz")
             for k, (_, _, b) in enumerate(images)]
    reference = tio.HistogramStandardization.train(paths, mask_path=masks, progress=False)
    # float32 as TorchIO reads them; split over two sites
    rows = [image_measure(s, image_landmarks(im.astype(np.float32)[b], 100.0))
            for s, im, b in images]
    sites = {"one": scanner_sums(rows[:9], 3), "two": scanner_sums(rows[9:], 3)}
    standard = combine_image_sums(sites, 100.0)
    np.testing.assert_allclose(standard.landmarks, reference, rtol=1e-9, atol=1e-9)
    assert len(standard.landmarks) == len(PERCENTILES) and standard.left_out == {}
    assert {s: n for s, (n, _) in standard.scanners.items()} == {"s1": 6, "s2": 6, "s3": 6}


def test_the_mapping_equals_torchio_histogram_standardization():
    images = _images(seed=1)
    rows = [image_measure(s, image_landmarks(im[b], 100.0)) for s, im, b in images]
    standard = combine_image_sums({"one": scanner_sums(rows, 1)}, 100.0)
    _, image, body = images[8]
    ours = standardize_histogram(image.astype(np.float32), body, standard.landmarks)
    subject = tio.Subject(image=tio.ScalarImage(tensor=image.astype(np.float32)[None]),
                          body=tio.LabelMap(tensor=body.astype(np.uint8)[None]))
    transform = tio.HistogramStandardization({"image": np.asarray(standard.landmarks)},
                                             masking_method="body")
    theirs = transform(subject).image.data.numpy()[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-3)


def test_standardization_undoes_a_gamma():
    rng = np.random.default_rng(2)
    clean = rng.choice([300.0, 620.0, 850.0], size=(10, 30, 30)) + rng.normal(0, 30, (10, 30, 30))
    body = np.ones(clean.shape, bool)
    warped = 1000.0 * (np.abs(clean) / 1000.0) ** 0.7 * 1.3
    rows = [image_measure("a", image_landmarks(clean[body], 100.0)),
            image_measure("b", image_landmarks(warped[body], 100.0))]
    standard = combine_image_sums({"one": scanner_sums(rows, 1)}, 100.0)
    a = standardize_histogram(clean, body, standard.landmarks)
    b = standardize_histogram(warped, body, standard.landmarks)
    raw_gap = np.abs(np.corrcoef(clean.ravel(), warped.ravel())[0, 1])
    assert raw_gap > 0.99  # monotone, so the ranks agree and the histograms can be matched
    assert np.median(np.abs(a - b)) < 0.02 * 100  # within 2% of the standard scale


def test_a_scanner_below_the_minimum_is_named_and_left_out():
    rows = [image_measure("big", np.linspace(0, 100, len(PERCENTILES)))] * 5 + [
        image_measure("tiny", np.linspace(0, 100, len(PERCENTILES)))] * 2
    sums = scanner_sums(rows, min_images=5)
    assert sums.scanners == ("big",) and sums.small == ("tiny",)
    assert sums.counts.tolist() == [5] and sums.landmarks.shape == (1, len(PERCENTILES))
    standard = combine_image_sums({"site_A": sums}, 100.0)
    assert standard.left_out == {"site_A": ("tiny",)} and set(standard.scanners) == {"big"}
    assert scanner_sums(rows[5:], min_images=5).scanners == ()


def test_json_round_trip_and_bad_input():
    standard = ImageStandard(tuple(np.linspace(0, 250, len(PERCENTILES))), 250.0,
                             {"a": (7, tuple(np.linspace(0, 250, len(PERCENTILES))))},
                             {"site_B": ("b",)})
    assert ImageStandard.from_json(standard.to_json()) == standard
    with pytest.raises(HarmonizationError, match="not the server's JSON"):
        ImageStandard.from_json('{"landmarks": 3}')
    with pytest.raises(HarmonizationError, match="13 finite"):
        ImageStandard.from_json(standard.to_json().replace('"landmarks": [0.0, ', '"landmarks": ['))
    with pytest.raises(HarmonizationError, match="constant"):
        image_landmarks(np.full(100, 7.0), 100.0)
    with pytest.raises(HarmonizationError, match="enough training images"):
        combine_image_sums({"a": scanner_sums([], 5)}, 100.0)


def test_the_noise_level_is_the_white_noise_sd_under_edges_texture_and_a_bias_field():
    rng = np.random.default_rng(3)
    z, y, x = np.meshgrid(np.arange(12), np.arange(60), np.arange(60), indexing="ij")
    tissue = np.where((x - 30) ** 2 + (y - 30) ** 2 < 15 ** 2, 620.0, 300.0)  # one edge
    field = 1.0 + 0.2 * np.sin(x / 20.0) * np.cos(y / 25.0)  # smooth: the residual cancels it
    body = np.ones(tissue.shape, bool)
    for sd in (5.0, 20.0):
        image = tissue * field + rng.normal(0, sd, tissue.shape)
        assert noise_level(image, body) == pytest.approx(sd, rel=0.05)
    with pytest.raises(HarmonizationError, match="fewer than"):
        noise_level(image, np.zeros(tissue.shape, bool))
    with pytest.raises(HarmonizationError, match="shape"):
        noise_level(image[0], body[0])


def test_smoothing_brings_a_finer_spacing_to_the_target_and_leaves_a_coarser_one():
    sigmas = smoothing_sigmas((0.7, 1.0, 3.0), (1.0, 1.0, 4.0))
    # a Gaussian of FWHM 0.7 convolved with these has FWHM 1.0
    assert math.hypot(0.7 / FWHM_PER_SIGMA, sigmas[0]) == pytest.approx(1.0 / FWHM_PER_SIGMA)
    assert sigmas[1] == 0.0 and sigmas[2] > 0
    assert smoothing_sigmas((2.0, 2.0, 5.0), (1.0, 1.0, 4.0)) == (0.0, 0.0, 0.0)


def test_the_acquisition_targets_are_the_noisiest_and_coarsest_scanners_means():
    line = np.linspace(0, 100, len(PERCENTILES))
    one = scanner_sums([image_measure("GE", line, 2.0, (0.7, 0.7, 3.0)),
                        image_measure("GE", line, 4.0, (0.7, 0.7, 3.0)),
                        image_measure("Siemens", line, 3.5, (0.9, 0.9, 4.0))], 1)
    two = scanner_sums([image_measure("GE", line, 6.0, (0.7, 0.7, 3.0))], 1)
    assert one.noise.tolist() == [6.0, 3.5] and one.spacing.tolist() == [[1.4, 1.4, 6.0],
                                                                          [0.9, 0.9, 4.0]]
    plain = combine_image_sums({"a": one, "b": two}, 100.0)
    assert plain.noise is None and plain.spacing is None
    assert plain.acquisition["GE"].noise == pytest.approx(4.0)  # (2 + 4 + 6) / 3
    matched = combine_image_sums({"a": one, "b": two}, 100.0, match_noise=True,
                                 match_resolution=True)
    assert matched.noise == pytest.approx(4.0) and matched.spacing == pytest.approx((0.9, 0.9,
                                                                                   4.0))
    shared = matched.shared()
    assert shared.scanners == {} and shared.acquisition == {}
    assert (shared.noise, shared.spacing) == (matched.noise, matched.spacing)
    assert ImageStandard.from_json(matched.to_json()) == matched
    with pytest.raises(HarmonizationError, match="target spacing"):
        ImageStandard.from_json(matched.to_json().replace('"spacing": [0.9', '"spacing": [-0.9'))
    with pytest.raises(HarmonizationError, match="negative or non-finite"):
        combine_image_sums({"a": replace(one, noise=np.array([-1.0, 3.5]))}, 100.0)
    with pytest.raises(HarmonizationError, match="shapes"):
        combine_image_sums({"a": replace(one, spacing=one.spacing[:, :2])}, 100.0)
