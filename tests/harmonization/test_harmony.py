from __future__ import annotations

import numpy as np
import pytest

from common.errors import HarmonizationError
from harmonization.harmony import HarmonyOptions, harmony_embeddings, lisi


def embeddings(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two biological groups (separated along dim 0) seen by three scanners that shift dims 1-2."""
    rng = np.random.default_rng(seed)
    n = 240
    batch = np.repeat(["s1", "s2", "s3"], n // 3)
    group = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, 8))
    x[:, 0] += 6.0 * group
    offsets = {"s1": (0.0, 0.0), "s2": (4.0, -3.0), "s3": (-4.0, 3.0)}
    x[:, 1:3] += np.array([offsets[b] for b in batch])
    return x, batch, group


def test_lisi_is_one_when_separated_and_near_the_count_when_mixed():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (300, 4))
    mixed = rng.choice(["a", "b", "c"], 300)
    assert lisi(x, mixed).mean() > 2.5
    apart = x + np.repeat([[0.0] * 4, [50.0] * 4, [100.0] * 4], 100, axis=0)
    assert lisi(apart, np.repeat(["a", "b", "c"], 100)).mean() < 1.05


def test_harmony_mixes_scanners_and_keeps_the_biology():
    x, batch, group = embeddings()
    corrected = harmony_embeddings(x, batch)
    assert corrected.shape == x.shape
    before, after = lisi(x, batch).mean(), lisi(corrected, batch).mean()
    assert after > before + 0.7, (before, after)
    assert lisi(corrected, group).mean() < 1.3  # the two groups stay apart
    np.testing.assert_array_equal(corrected, harmony_embeddings(x, batch, HarmonyOptions()))


def test_harmony_refuses_bad_input():
    x, batch, _ = embeddings()
    with pytest.raises(HarmonizationError, match="two or more batches"):
        harmony_embeddings(x, ["one"] * len(x))
    with pytest.raises(HarmonizationError, match="batch labels for"):
        harmony_embeddings(x, batch[:-1])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(HarmonizationError, match="finite"):
        harmony_embeddings(bad, batch)
