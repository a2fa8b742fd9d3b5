"""Image harmonization, before the preparation: each training image's histogram landmarks after
N4 and normalization, noise level and voxel spacing, summed per scanner
(:mod:`harmonization.images`); the sums back.

The training images are the split the preparation will make (:func:`client.folds.training_cases`).
A scanner of fewer than the site's ``min_patients`` training images is named, not summed. The
sums are entered in a release ledger of their own (landmarks are not features: no difference of
them with a feature sum means anything), which refuses a repeated request over other rows.
"""

from __future__ import annotations

import numpy as np

from client.folds import training_cases
from client.ledger import release
from client.pipeline import landmark_rows, run_cases
from client.segment.masks import study_manifest
from client.workspace import study_dir
from common.protocol import StudyProtocol
from common.site_config import SiteConfig
from harmonization.images import ImageSums, scanner_sums

#: Where a site's ledger of landmark sums lives, under its study folder.
LANDMARKS_LEDGER = "landmarks"


def image_landmarks(site: SiteConfig, protocol: StudyProtocol, seed: int, test_fraction: float
                    ) -> ImageSums:
    """The sums of this site's training images' landmarks per scanner."""
    cases, _ = study_manifest(site, protocol)
    training = training_cases(cases, protocol, seed, site.site_name, test_fraction,
                              site.min_patients)
    chosen = [c for c in cases if c.case_id in training]
    outcomes = run_cases(chosen, protocol, mode="landmarks", workers=site.n_workers,
                         cache_dir=site.cache_dir, max_voxels=site.budget,
                         time_limit_s=site.case_time_limit_s)
    measured = landmark_rows(chosen, outcomes)
    sums = scanner_sums([measure for _, measure in measured], site.min_patients)
    batches = np.array([case.batch for case, _ in measured])
    release(study_dir(site, protocol) / LANDMARKS_LEDGER, "the image landmarks",
            [case.case_id for case, _ in measured], [batches == s for s in sums.scanners],
            site.min_patients)
    return sums
