"""A site's image harmonization phase: the landmark sums of its training images per scanner
(the split the preparation then makes), a small scanner named without its count, the ledger;
the preparation standardizes onto the study's standard (reading the N4 correction the phase
kept) and keeps it for the CNN."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.folds import training_cases
from client.ledger import LEDGER_FILE, ReleaseRefused
from client.manifest import read_manifest
from client.phases.images import LANDMARKS_LEDGER, image_landmarks
from client.phases.prepare import prepare
from client.pipeline import N4_SUFFIX, run_cases
from client.standardize import BiasFieldCorrection
from client.workspace import IMAGE_STANDARD_FILE, PREPARED_FILE, load_image_standard, study_dir
from common.errors import ConfigError
from common.protocol import (
    BiasCorrectionSpec,
    HistogramSpec,
    MatchingSpec,
    RadiomicsSpec,
    StudyProtocol,
    load_protocol,
)
from common.site_config import SiteConfig
from common.synthetic import CohortSpec, make_sites, write_cohort
from harmonization.images import PERCENTILES, combine_image_sums

N_PATIENTS = 16  # site_B: two scanners, one of them holding few training images


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_cohort(root / "cohort", CohortSpec(make_sites((4, N_PATIENTS))), workers=2)
    return root / "cohort"


def _site(cohort: Path, work: Path, min_patients: int = 5) -> SiteConfig:
    return SiteConfig(site_name="site_B", manifest=cohort / "site_B" / "manifest.csv",
                      work_dir=work, workers=2, min_patients=min_patients)


def _protocol(cohort: Path) -> StudyProtocol:
    protocol = load_protocol(cohort / "study.yaml")
    std = protocol.standardization.model_copy(update={
        "bias_correction": None, "histogram": HistogramSpec(scale=250.0),  # N4 off: quicker
        "matching": None})  # the histogram alone; matching has its own test below
    return protocol.model_copy(update={
        "standardization": std, "cnn": None,
        "radiomics": RadiomicsSpec(feature_classes={"firstorder": ()}, bin_width=5.0)})


def test_the_sums_are_over_the_training_images_per_scanner(cohort: Path, tmp_path: Path):
    protocol, site = _protocol(cohort), _site(cohort, tmp_path / "work", min_patients=3)
    sums = image_landmarks(site, protocol, seed=0, test_fraction=0.3)
    cases, _ = read_manifest(site.manifest, protocol, default_batch="site_B")
    training = training_cases(cases, protocol, 0, "site_B", 0.3)
    chosen = [c for c in cases if c.case_id in training]
    outcomes = run_cases(chosen, protocol, mode="landmarks", workers=1, cache_dir=None)
    expected: dict[str, list[np.ndarray]] = {}
    for case, outcome in zip(chosen, outcomes, strict=True):
        # the landmarks, then the noise level and the spacing
        expected.setdefault(case.batch, []).append(np.array(list(outcome.features.values())))
    kept = sorted(s for s, rows in expected.items() if len(rows) >= 3)
    assert sums.scanners == tuple(kept)
    for i, scanner in enumerate(sums.scanners):
        assert sums.counts[i] == len(expected[scanner])
        total = np.sum(expected[scanner], axis=0)
        np.testing.assert_allclose(sums.landmarks[i], total[:len(PERCENTILES)], rtol=1e-12)
        np.testing.assert_allclose(sums.noise[i], total[len(PERCENTILES)], rtol=1e-12)
        np.testing.assert_allclose(sums.spacing[i], total[len(PERCENTILES) + 1:], rtol=1e-12)
        assert sums.noise[i] > 0
    assert sums.small == tuple(sorted(set(expected) - set(kept)))
    assert (study_dir(site, protocol) / LANDMARKS_LEDGER / LEDGER_FILE).is_file()
    # the same request again passes the ledger; over other rows (another split) it may not
    image_landmarks(site, protocol, seed=0, test_fraction=0.3)
    with pytest.raises(ReleaseRefused, match="the image landmarks"):
        image_landmarks(site, protocol, seed=1, test_fraction=0.3)


def test_a_scanner_of_too_few_training_images_is_named_not_summed(cohort: Path, tmp_path: Path):
    protocol, site = _protocol(cohort), _site(cohort, tmp_path / "work", min_patients=9)
    sums = image_landmarks(site, protocol, seed=0, test_fraction=0.3)
    assert len(sums.small) >= 1 and not set(sums.small) & set(sums.scanners)
    assert all(count >= 9 for count in sums.counts)


def test_the_preparation_standardizes_onto_the_study_standard(cohort: Path, tmp_path: Path):
    protocol, site = _protocol(cohort), _site(cohort, tmp_path / "work", min_patients=3)
    with pytest.raises(ConfigError, match="standard landmarks are missing"):
        prepare(site, protocol, seed=0, test_fraction=0.3)
    standard = combine_image_sums({"site_B": image_landmarks(site, protocol, 0, 0.3)},
                                  protocol.standardization.histogram.scale)
    reply = prepare(site, protocol, seed=0, test_fraction=0.3, standard=standard)
    assert reply.status == "ok"
    assert load_image_standard(site, protocol) == standard
    saved = json.loads((study_dir(site, protocol) / IMAGE_STANDARD_FILE).read_text())
    assert saved["landmarks"] == list(standard.landmarks)
    table = pd.read_parquet(study_dir(site, protocol) / PREPARED_FILE)
    cases, _ = read_manifest(site.manifest, protocol, default_batch="site_B")
    assert set(table.case_id[table.split == "train"]) == training_cases(
        cases, protocol, 0, "site_B", 0.3)
    # another standard gives other features (the cache is keyed on it)
    other = replace(standard, landmarks=tuple(np.asarray(standard.landmarks) * 1.1))
    prepare(site, protocol, seed=0, test_fraction=0.3, standard=other)
    changed = pd.read_parquet(study_dir(site, protocol) / PREPARED_FILE)
    column = "original_firstorder_Mean"
    assert not np.allclose(changed[column], table[column])
    assert len(PERCENTILES) == len(standard.landmarks)


def test_acquisition_matching_smooths_and_adds_noise_onto_the_study_targets(cohort: Path,
                                                                           tmp_path: Path):
    protocol, site = _protocol(cohort), _site(cohort, tmp_path / "work", min_patients=3)
    matched = protocol.model_copy(update={"standardization": protocol.standardization.model_copy(
        update={"matching": MatchingSpec()})})
    sums = image_landmarks(site, matched, seed=0, test_fraction=0.3)
    plain = combine_image_sums({"site_B": sums}, 250.0)
    with pytest.raises(ConfigError, match="no acquisition target"):
        prepare(site, matched, seed=0, test_fraction=0.3, standard=plain)
    standard = combine_image_sums({"site_B": sums}, 250.0, match_noise=True,
                                  match_resolution=True)
    means = sums.noise / sums.counts
    assert standard.noise == pytest.approx(means.max())
    np.testing.assert_allclose(standard.spacing, (sums.spacing / sums.counts[:, None]).max(axis=0))
    prepare(site, protocol, seed=0, test_fraction=0.3, standard=plain)
    before = pd.read_parquet(study_dir(site, protocol) / PREPARED_FILE)
    assert prepare(site, matched, seed=0, test_fraction=0.3, standard=standard).status == "ok"
    after = pd.read_parquet(study_dir(site, matched) / PREPARED_FILE)
    # smoother and noisier: the marrow's intensity spread changes, its mean hardly
    column = "original_firstorder_Mean"
    np.testing.assert_allclose(after[column], before[column], rtol=0.1)
    assert not np.allclose(after["original_firstorder_Variance"],
                           before["original_firstorder_Variance"])
    provenance = json.loads((study_dir(site, matched) / IMAGE_STANDARD_FILE).read_text())
    assert provenance["noise"] == standard.noise and provenance["spacing"] == list(
        standard.spacing)


def test_the_preparation_reads_the_n4_correction_the_landmarks_made(
        cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    protocol = _protocol(cohort)
    protocol = protocol.model_copy(update={"standardization": protocol.standardization.model_copy(
        update={"bias_correction": BiasCorrectionSpec(iterations=(5, 5))})})
    # one worker: the corrections are counted in this process
    site = _site(cohort, tmp_path / "work", min_patients=3).model_copy(update={"workers": 1})
    corrected: list[int] = []
    n4 = BiasFieldCorrection.__call__
    monkeypatch.setattr(BiasFieldCorrection, "__call__",
                        lambda self, volume: corrected.append(1) or n4(self, volume))
    standard = combine_image_sums({"site_B": image_landmarks(site, protocol, 0, 0.3)}, 250.0)
    cases, _ = read_manifest(site.manifest, protocol, default_batch="site_B")
    training = training_cases(cases, protocol, 0, "site_B", 0.3)
    assert len(corrected) == len(training)
    assert len(list(site.cache_dir.rglob(f"*{N4_SUFFIX}"))) == len(training)
    assert prepare(site, protocol, seed=0, test_fraction=0.3, standard=standard).status == "ok"
    assert len(corrected) == len(cases)  # the test images only: the training ones were read
    # the same features as a site that corrects every image in the preparation (two workers:
    # a case's N4 does not depend on its threads)
    fresh = _site(cohort, tmp_path / "fresh", min_patients=3)
    assert prepare(fresh, protocol, seed=0, test_fraction=0.3, standard=standard).status == "ok"
    pd.testing.assert_frame_equal(pd.read_parquet(study_dir(site, protocol) / PREPARED_FILE),
                                  pd.read_parquet(study_dir(fresh, protocol) / PREPARED_FILE))
