"""Resource limits (issue 20): what is sized by the input (an image's voxels, the grid it is
resampled to, the grey levels of its discretization) is checked before it is allocated, and a
protocol names only what pyradiomics computes, within sane ranges."""

from __future__ import annotations

import gzip
import os
import resource
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from client.extract import FeatureExtractor
from client.loading import read_image
from client.manifest import CaseSpec
from client.standardize import Volume, build_steps, standardize
from common.errors import MAX_CASE_VOXELS, CaseError, ConfigError, SkipReason
from common.protocol import FEATURE_NAMES, MAX_BINS, load_protocol, protocol_from_mapping
from harmonization.images import PERCENTILES, ImageStandard
from tests.conftest import make_volume


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def nifti_bomb(path: Path, dims: tuple[int, int, int], fill: int = 0) -> None:
    """A valid gzipped NIfTI-1 of ``fill`` (uint8; zeros by default) whose header declares
    ``dims``: a few MB on disk, ``prod(dims)`` bytes once read."""
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, *dims, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 2, 8)  # datatype uint8, 8 bits
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    struct.pack_into("<f", header, 112, 1.0)  # scl_slope
    struct.pack_into("<h", header, 254, 1)  # sform_code
    struct.pack_into("<4f", header, 280, 1, 0, 0, 0)
    struct.pack_into("<4f", header, 296, 0, 1, 0, 0)
    struct.pack_into("<4f", header, 312, 0, 0, 1, 0)
    header[344:348] = b"n+1\x00"
    zeros = bytes([fill]) * (1 << 24)
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(bytes(header))
        left = int(np.prod(dims))
        while left:
            fh.write(zeros[: min(left, len(zeros))])
            left -= min(left, len(zeros))


def case(image: Path) -> CaseSpec:
    return CaseSpec(case_id="bomb", row=2, image=image, mask=image, label=1.0, batch="s",
                    roi=None, series_uid=None, covariates={})


def test_a_nifti_whose_header_declares_too_many_voxels_is_refused_before_it_is_read(
        tmp_path: Path):
    """A small .nii.gz of zeros declaring 1024 x 1024 x 512 voxels (over the default limit of
    2^28) is skipped from its header: no memory is spent on it (before, the whole volume was
    read, then copied as float32)."""
    path = tmp_path / "bomb.nii.gz"
    nifti_bomb(path, (1024, 1024, 512))
    assert path.stat().st_size < 8 << 20
    before = _peak_rss_mb()
    with pytest.raises(CaseError) as refused:
        read_image(case(path), load_protocol("preset:spine_mri_t1w"))
    assert refused.value.reason is SkipReason.RESOURCE_LIMIT
    assert "1024 x 1024 x 512 = 536,870,912 voxels, more than this site's max_case_voxels " \
        f"({MAX_CASE_VOXELS:,})" in refused.value.detail
    assert _peak_rss_mb() - before < 100
    # a site that allows it reads it (a smaller one here, to keep the test light)
    small = tmp_path / "small.nii.gz"
    nifti_bomb(small, (64, 64, 32))
    with pytest.raises(CaseError, match="max_case_voxels"):
        read_image(case(small), load_protocol("preset:spine_mri_t1w"), max_voxels=100_000)
    assert read_image(case(small), load_protocol("preset:spine_mri_t1w"),
                      max_voxels=200_000).GetSize() == (64, 64, 32)


def test_a_resampled_grid_over_the_limit_is_refused_before_it_is_allocated():
    """spacing_mm [0.01, 0.01, 4] used to take minutes and gigabytes on one case (the protocol
    now refuses spacings under 0.1 mm); a grid at the finest allowed spacing is still held to
    the site's limit: here a small volume at 0.1 mm against a limit of 10^4 voxels."""
    image, labels = make_volume()
    mapping = load_protocol("preset:spine_mri_t1w").model_dump(mode="json")
    mapping["standardization"]["resample"]["spacing_mm"] = [0.1, 0.1, 4.0]
    mapping["standardization"]["bias_correction"] = None
    mapping["standardization"].update(histogram=None, matching=None)
    protocol = protocol_from_mapping(mapping)
    with pytest.raises(CaseError) as refused:
        standardize(Volume(image, labels, 1), build_steps(protocol, max_voxels=10_000))
    assert refused.value.reason is SkipReason.RESOURCE_LIMIT
    assert "the grid resampled to (0.1, 0.1, 4.0) mm has" in refused.value.detail


def test_a_fixed_bin_size_giving_too_many_grey_levels_is_refused():
    image, labels = make_volume()
    mapping = load_protocol("preset:ibsi_digital_phantom").model_dump(mode="json")
    mapping["radiomics"]["bin_width"] = 1e-6
    extractor = FeatureExtractor(protocol_from_mapping(mapping))
    roi = sitk.Cast(labels == 1, sitk.sitkUInt8)
    with pytest.raises(CaseError) as refused:
        extractor.extract(image, roi, roi)
    assert refused.value.reason is SkipReason.RESOURCE_LIMIT
    assert f"more than {MAX_BINS:,}: widen radiomics.bin_width" in refused.value.detail


@pytest.mark.parametrize(("patch", "reason"), [
    ({"bin_count": 10**12, "discretization": "fixed_bin_number"},
     "radiomics.bin_count: Input should be less than or equal to 1024"),
    ({"bin_width": float("inf")}, "radiomics.bin_width: Input should be a finite number"),
    ({"feature_classes": {"firstorder": ["NoSuchFeature"]}},
     "feature_classes.firstorder: no feature ['NoSuchFeature'] in pyradiomics"),
    ({"feature_classes": {"ibsi": ["dzm_sde_3D"]}},
     "feature_classes.ibsi: no feature ['dzm_sde_3D'] in the project's IBSI class"),
    ({"per_slice": True, "force_2d": False}, "per_slice (IBSI 2D) needs force_2d = true"),
    ({"ivh_discretization": "fixed_bin_number"},
     "ivh_discretization fixed_bin_number needs 'ivh_bin_count'"),
    ({"ivh_discretization": "fixed_bin_size", "ivh_bin_width": 0},
     "radiomics.ivh_bin_width: Input should be greater than 0"),
    ({"texture_aggregation": "summed"}, "radiomics.texture_aggregation: Input should be"),
])
def test_the_protocol_refuses_what_extraction_would_fail_on(patch, reason):
    mapping = load_protocol("preset:spine_mri_t1w").model_dump(mode="json")
    mapping["radiomics"].update(patch)
    with pytest.raises(ConfigError) as refused:
        protocol_from_mapping(mapping)
    assert reason in str(refused.value)


def test_the_feature_names_are_pyradiomics():
    from radiomics import getFeatureClasses

    from client.ibsi_features import compute

    assert {name: frozenset(cls.getFeatureNames()) for name, cls in getFeatureClasses().items()
            } == {k: v for k, v in FEATURE_NAMES.items() if k != "ibsi"}
    # The project's own class: what client.ibsi_features computes, by IBSI tag.
    image = np.arange(5 * 6 * 7, dtype=float).reshape(5, 6, 7) % 11
    mask = np.zeros(image.shape, dtype=bool)
    mask[1:4, 1:5, 1:6] = True
    levels = np.where(mask, 1 + image.astype(int) // 3, 0)
    assert frozenset(compute(image, mask, mask, levels, (1.0, 1.0, 1.0))) == FEATURE_NAMES["ibsi"]



# --- non-finite voxels -------------------------------------------------------------------------

def test_nan_or_inf_voxels_skip_the_case_or_leave_every_label(tmp_path: Path):
    """An image with a slice of NaN and an inf voxel was extracted as if they were numbers. It is
    skipped by name now, or, with ``ingestion.non_finite = "mask"``, those voxels leave the ROI
    and the reference tissue and take the image's median."""
    from client.loading import load_case

    image, labels = make_volume()
    values = sitk.GetArrayFromImage(image)
    values[6] = np.nan  # a slice through the ROI
    values[0, 0, 0] = np.inf
    bad_image = sitk.GetImageFromArray(values)
    bad_image.CopyInformation(image)
    sitk.WriteImage(bad_image, str(tmp_path / "image.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "mask.nii.gz"))
    spec = CaseSpec(case_id="nan", row=2, image=tmp_path / "image.nii.gz",
                    mask=tmp_path / "mask.nii.gz", label=1.0, batch="s")
    protocol = load_protocol("preset:spine_mri_t1w")
    roi_in_slice = int((sitk.GetArrayViewFromImage(labels)[6] != 0).sum())
    with pytest.raises(CaseError) as refused:
        load_case(spec, protocol)
    assert refused.value.reason is SkipReason.NON_FINITE_VOXELS
    assert (f"holds {24 * 24 + 1:,} NaN or infinite voxel(s), {roi_in_slice} of them labelled: "
            "set ingestion.non_finite = 'mask'") in refused.value.detail
    mapping = protocol.model_dump(mode="json")
    mapping["ingestion"]["non_finite"] = "mask"
    volume = load_case(spec, protocol_from_mapping(mapping))
    got = sitk.GetArrayViewFromImage(volume.image)
    assert np.isfinite(got).all()
    assert not sitk.GetArrayViewFromImage(volume.labels)[6].any()
    assert sitk.GetArrayViewFromImage(volume.labels).sum() == \
        sitk.GetArrayViewFromImage(labels).sum() - roi_in_slice


def test_site_check_finds_a_missing_reference_tissue_as_extraction_would(tmp_path: Path):
    """A mask without the protocol's reference-tissue label passed `site check` and was then
    skipped by `site extract`: both name it now, the same way."""
    from client.pipeline import CaseProcessor

    image, labels = make_volume()
    sitk.WriteImage(image, str(tmp_path / "image.nii.gz"))
    sitk.WriteImage(sitk.Cast(labels == 1, sitk.sitkUInt8), str(tmp_path / "mask.nii.gz"))
    spec = CaseSpec(case_id="no_muscle", row=2, image=tmp_path / "image.nii.gz",
                    mask=tmp_path / "mask.nii.gz", label=1.0, batch="s")
    protocol = load_protocol("preset:spine_mri_t1w")  # reference tissue: label 2
    standard = ImageStandard(tuple(np.linspace(0.0, 250.0, len(PERCENTILES))), 250.0,
                             noise=2.0, spacing=(1.0, 1.0, 4.0))
    for mode in ("check", "landmarks", "extract"):
        outcome = CaseProcessor(protocol, mode, None, standard=standard)(spec)
        assert outcome.reason is SkipReason.ROI_NOT_FOUND, mode
        assert "the reference tissue (label 2) that MR normalization divides by is absent" \
            in outcome.detail


def test_a_case_past_the_time_limit_is_skipped_and_the_next_goes_on(tmp_path: Path):
    """The site's case_time_limit_s: a case past it is skipped (resource_limit), even where the
    timer fires inside pyradiomics (its per-feature ``except Exception`` would have made a NaN
    of an ordinary exception); the processor goes on with the next case."""
    from client.pipeline import CaseProcessor

    image, labels = make_volume()
    sitk.WriteImage(image, str(tmp_path / "image.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "mask.nii.gz"))
    spec = CaseSpec(case_id="slow", row=2, image=tmp_path / "image.nii.gz",
                    mask=tmp_path / "mask.nii.gz", label=1.0, batch="s")
    protocol = load_protocol("preset:ibsi_digital_phantom")
    for limit in (1e-4, 0.05):
        outcome = CaseProcessor(protocol, "extract", None, time_limit_s=limit)(spec)
        assert outcome.reason is SkipReason.RESOURCE_LIMIT
        assert f"took more than the site's case_time_limit_s ({limit:g} s)" in outcome.detail
    done = CaseProcessor(protocol, "extract", None, time_limit_s=60)(spec)
    assert done.reason is None and done.features


def test_a_stuck_case_is_killed_and_a_dead_one_named_while_the_others_finish(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """With several workers every case runs in its own process: one stuck where the timer cannot
    reach it (SIGALRM blocked, as in a long ITK call) is killed after the grace, one killed by
    the system (SIGKILL, as the out-of-memory killer does) is named, and the others finish."""
    import signal
    import time

    from client import pipeline

    image, labels = make_volume()
    sitk.WriteImage(image, str(tmp_path / "image.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "mask.nii.gz"))
    cases = [CaseSpec(case_id=name, row=2 + k, image=tmp_path / "image.nii.gz",
                      mask=tmp_path / "mask.nii.gz", label=1.0, batch="s")
             for k, name in enumerate(["ok_1", "stuck", "killed", "ok_2"])]
    original = pipeline.CaseProcessor._process

    def process(self, case, start):
        if case.case_id == "stuck":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(120)
        if case.case_id == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, case, start)

    monkeypatch.setattr(pipeline.CaseProcessor, "_process", process)
    monkeypatch.setattr(pipeline, "KILL_GRACE_S", 1.0)
    started = time.monotonic()
    outcomes = pipeline.run_cases(cases, load_protocol("preset:ibsi_digital_phantom"),
                                  mode="extract", workers=2, cache_dir=None, time_limit_s=1.0)
    assert time.monotonic() - started < 60
    by_id = {o.case_id: o for o in outcomes}
    assert [o.case_id for o in outcomes] == ["ok_1", "stuck", "killed", "ok_2"]
    assert by_id["ok_1"].ok and by_id["ok_2"].ok and by_id["ok_1"].features
    assert by_id["stuck"].reason is SkipReason.RESOURCE_LIMIT
    assert "its process was killed" in by_id["stuck"].detail
    assert by_id["killed"].reason is SkipReason.RESOURCE_LIMIT
    assert "out-of-memory killer" in by_id["killed"].detail


def test_a_case_over_the_memory_budget_is_refused_before_it_is_read(tmp_path: Path):
    """max_case_memory_mb: the header's grid, at the measured bytes per voxel, is over the
    budget, so the case is skipped naming the estimate, with no memory spent on it."""
    from client.pipeline import CaseProcessor
    from common.site_config import Budget

    path = tmp_path / "big.nii.gz"
    nifti_bomb(path, (256, 256, 128))  # 8.4 million voxels: about 448 MB to process
    before = _peak_rss_mb()
    outcome = CaseProcessor(load_protocol("preset:ibsi_digital_phantom"), "extract", None,
                            Budget(max_memory_mb=256))(case(path))
    assert outcome.reason is SkipReason.RESOURCE_LIMIT
    assert "about 448 MB to process (64 MB and 48 bytes per voxel), more than this site's " \
        "max_case_memory_mb (256)" in outcome.detail
    assert _peak_rss_mb() - before < 50


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA caps memory on "
                    "Linux only")
def test_a_case_that_outgrows_the_estimate_is_stopped_at_the_cap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The estimate can be wrong (a big ROI's texture matrices): with several workers the case's
    process is capped at max_case_memory_mb, so the allocation past it fails, that case is
    skipped as out of memory, and the small case beside it is extracted."""
    from client import limits, pipeline
    from common.site_config import Budget

    monkeypatch.setattr(limits, "BYTES_PER_VOXEL", 1)  # an estimate far too low
    monkeypatch.setattr(limits, "ESTIMATE_BASE_MB", 0)
    big = tmp_path / "big.nii.gz"
    nifti_bomb(big, (512, 512, 160), fill=1)  # 42 million voxels, all in the ROI
    image, labels = make_volume()
    sitk.WriteImage(image, str(tmp_path / "image.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "mask.nii.gz"))
    cases = [case(big), CaseSpec(case_id="small", row=3, image=tmp_path / "image.nii.gz",
                                 mask=tmp_path / "mask.nii.gz", label=1.0, batch="s")]
    outcomes = pipeline.run_cases(cases, load_protocol("preset:ibsi_digital_phantom"),
                                  mode="extract", workers=2, cache_dir=None,
                                  max_voxels=Budget(max_memory_mb=256))
    assert outcomes[0].reason is SkipReason.RESOURCE_LIMIT, outcomes[0]
    assert "max_case_memory_mb (256)" in outcomes[0].detail
    assert outcomes[1].ok
