"""ICC(3,1) against the worked example of Shrout and Fleiss (1979, Table 2: six targets, four
judges; their ICC(3,1) is 0.71) and its limiting cases."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics.agreement import icc_3_1

SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6],
                          [10, 5, 6, 9], [6, 2, 4, 7]], dtype=float)


def test_the_worked_example_of_shrout_and_fleiss():
    assert icc_3_1(SHROUT_FLEISS) == pytest.approx(0.7148, abs=5e-4)


def test_per_feature_constant_offsets_agree_and_noise_does_not():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(50, 1, 3))
    ratings = np.concatenate([truth, truth + 5.0], axis=1)  # consistency: an offset is fine
    ratings[:, 1, 2] = rng.normal(size=50)  # feature 2: the second rater is noise
    icc = icc_3_1(ratings)
    assert icc[0] == pytest.approx(1.0) and icc[1] == pytest.approx(1.0)
    assert abs(icc[2]) < 0.35
    ratings[:, :, 0] = 1.0
    assert np.isnan(icc_3_1(ratings)[0])  # constant: no variance to share
    with pytest.raises(ValueError, match="raters >= 2"):
        icc_3_1(np.ones((5, 1)))
