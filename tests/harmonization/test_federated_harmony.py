"""Federated Harmony against harmonypy on the pooled embeddings, and what its sites send."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import HarmonizationError
from common.records import check_sent, to_record
from harmonization.federated_harmony import (
    Coreset,
    FederatedHarmonyOptions,
    HarmonySite,
    Masses,
    RidgeSums,
    ScannerCounts,
)
from harmonization.harmony import HarmonyOptions, harmony_embeddings, lisi
from harmonization.harmony_server import federated_harmony
from tests.harmonization.test_harmony import embeddings

pytest.importorskip("harmonypy")  # the reference (harmonization.harmony wraps it)


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two groups x three scanners, six tight blobs: k-means has one answer, so harmonypy's
    start and the sites' start are the same clusters and the runs can be compared step by
    step."""
    rng = np.random.default_rng(seed)
    n = 240
    batch = np.repeat(["s1", "s2", "s3"], n // 3)
    x = rng.normal(0, 0.3, (n, 8)) + 1.0
    x[:, 0] += 6.0 * rng.integers(0, 2, n)
    offsets = {"s1": (0.0, 0.0), "s2": (4.0, -3.0), "s3": (-4.0, 3.0)}
    x[:, 1:3] += np.array([offsets[b] for b in batch])
    return x, batch


def imbalanced(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two clear groups whose scanners are unevenly spread (s1 crowds the first, s2 the
    second) and close enough for soft memberships: the diversity penalty moves cells here, so
    a membership update without it, or with another, ends elsewhere."""
    rng = np.random.default_rng(seed)
    counts = {("s1", 0): 60, ("s2", 0): 15, ("s3", 0): 15,
              ("s1", 1): 15, ("s2", 1): 45, ("s3", 1): 30}
    xs, batch = [], []
    for (scanner, group), n in counts.items():
        v = rng.normal(0, 0.3, (n, 6))
        v[:, 0] += 3.0
        v[:, 1] += 1.5 * group
        v[:, 2] += {"s1": 0.0, "s2": 0.5, "s3": -0.5}[scanner]
        xs.append(v)
        batch += [scanner] * n
    return np.vstack(xs), np.asarray(batch)


def by_sites(x: np.ndarray, batch: np.ndarray, groups: list[list[str]], options
             ) -> tuple[np.ndarray, tuple[str, ...]]:
    masks = [np.isin(batch, g) for g in groups]
    result = federated_harmony([x[m] for m in masks], [batch[m] for m in masks], options)
    out = np.empty_like(x)
    for mask, corrected in zip(masks, result.corrected, strict=True):
        out[mask] = corrected
    return out, result.dropped


@pytest.mark.parametrize("groups", [[["s1", "s2", "s3"]], [["s1", "s2"], ["s3"]],
                                    [["s1"], ["s2"], ["s3"]]])
@pytest.mark.parametrize(("data", "clusters"), [(blobs, 6), (imbalanced, 2)])
def test_equals_harmonypy_on_the_pooled_embeddings_from_the_same_start(data, clusters, groups):
    """Where k-means has one answer the sites start where harmonypy does, and the whole run
    (memberships in blocks, the ridge, the centroids, the stopping rule) ends where it does:
    within 0.2% of the correction (a run without the diversity penalty is 10 to 80% off)."""
    x, batch = data()
    reference = harmony_embeddings(x, batch, HarmonyOptions(n_clusters=clusters, seed=0))
    ours, _ = by_sites(x, batch, groups, FederatedHarmonyOptions(n_clusters=clusters))
    correction = np.linalg.norm(reference - x)
    assert correction > 1.0  # there was something to correct
    assert np.linalg.norm(ours - reference) / correction < 2e-3


def test_mixes_the_scanners_as_harmonypy_does_and_keeps_the_biology():
    """Where the clusters are not clear-cut Harmony's optimum depends on its start and its
    random blocks, for harmonypy as for the sites (harmonypy's own seeds differ by up to 0.6
    LISI here): the sites' run mixes the scanners about as well, and keeps the groups apart."""
    gains, gaps = [], []
    for seed in range(3):
        x, batch, group = embeddings(seed)
        ours, _ = by_sites(x, batch, [["s1"], ["s2"], ["s3"]], FederatedHarmonyOptions(seed=seed))
        reference = harmony_embeddings(x, batch, HarmonyOptions(seed=seed))
        before = lisi(x, batch).mean()
        gains.append(lisi(ours, batch).mean() - before)
        gaps.append(lisi(reference, batch).mean() - lisi(ours, batch).mean())
        assert lisi(ours, group).mean() < 1.15  # the two groups stay apart
    assert min(gains) > 0.5, gains
    assert np.mean(gaps) < 0.35, gaps


def test_a_scanner_under_the_floor_takes_no_part_and_is_named():
    x, batch = blobs()
    extra = np.random.default_rng(3).normal(0, 1, (3, 8))
    sites = [x[batch == "s1"], np.vstack([x[batch != "s1"], extra])]
    labels = [batch[batch == "s1"], np.concatenate([batch[batch != "s1"], ["tiny"] * 3])]
    result = federated_harmony(sites, labels, FederatedHarmonyOptions(n_clusters=6))
    assert result.dropped == ("tiny",)
    np.testing.assert_array_equal(result.corrected[1][-3:], extra)
    with pytest.raises(HarmonizationError, match="two or more scanners"):
        federated_harmony([x[batch == "s1"]], [batch[batch == "s1"]])


def test_sums_over_too_few_effective_cells_are_withheld():
    """A cluster that holds one patient of a scanner (an outlier far from everyone) would give
    that patient's embedding as the scanner's sum: withheld, the cluster is not corrected for
    that scanner. Sums spread over many cells, however small their memberships, go."""
    x, batch = blobs()
    own = batch != "s1"
    cells, labels = x[own].copy(), batch[own]
    cells[0] = -10.0  # one patient of s2, pointing away from everyone
    options = FederatedHarmonyOptions(n_clusters=6)
    site = HarmonySite(cells, labels, options)
    site.join(["s1", "s2", "s3"])
    centroids = np.vstack([site.coreset(3).sums, cells[:1]])
    site.start(centroids / np.linalg.norm(centroids, axis=1, keepdims=True))
    sums = site.ridge()
    assert sums.withheld[-1, 0]  # the outlier's cluster, scanner s2
    assert np.all(sums.weighted[sums.withheld] == 0.0)
    for j, scanner in enumerate(["s2", "s3"]):
        r = site._r[site._codes == j]
        effective = r.sum(axis=0) ** 2 / (r**2).sum(axis=0)
        np.testing.assert_array_equal(sums.withheld[:, j], effective < options.min_cell,
                                      err_msg=scanner)


def test_what_a_site_sends_has_no_per_patient_axis():
    """Each message passes the privacy guard's check with sizes known before any patient is
    counted: clusters, dimensions, the site's scanners and at most two centres per cluster."""
    x, batch = blobs()
    site = HarmonySite(x[batch != "s1"], batch[batch != "s1"], FederatedHarmonyOptions())
    site.join(["s1", "s2", "s3"])
    k, dims = 6, x.shape[1]
    sizes = {"clusters": k, "dims": dims, "site_scanners": 2, "centres": range(2 * k + 1)}
    coreset = site.coreset(k)
    centroids = coreset.sums[:k] / np.linalg.norm(coreset.sums[:k], axis=1, keepdims=True)
    messages = [site.scanner_counts(), coreset, site.start(centroids),
                site.cluster(np.full(k, 40.0), np.array([1 / 3, 1 / 3])), site.ridge()]
    for message, cls in zip(messages, [ScannerCounts, Coreset, Masses, Masses, RidgeSums],
                            strict=True):
        check_sent(to_record(message), cls, sizes, {"min_patients": 5}, sender="site_B")
    assert site.cells == 160 and 160 not in sizes.values()


def test_bad_input_is_refused_by_name():
    x, batch = blobs()
    bad = x.copy()
    bad[0, 0] = np.inf
    with pytest.raises(HarmonizationError, match="finite"):
        HarmonySite(bad, batch)
    with pytest.raises(HarmonizationError, match="239 scanner labels for 240"):
        HarmonySite(x, batch[:-1])
    with pytest.raises(HarmonizationError, match="'s2' is at two sites"):
        federated_harmony([x[batch != "s1"], x[batch == "s2"]],
                          [batch[batch != "s1"], batch[batch == "s2"]])
    with pytest.raises(HarmonizationError, match="block_size"):
        FederatedHarmonyOptions(block_size=0.0)


def test_a_site_kept_on_disk_between_rounds_answers_as_one_kept_in_memory(tmp_path):
    """Each message starts a fresh site process: a site read back from its saved state each
    round (memberships, corrections, its random stream) ends where the in-memory run does."""
    from harmonization.federated_harmony import answer
    from harmonization.harmony_server import harmony_rounds

    x, batch = imbalanced()
    groups = [["s1"], ["s2", "s3"]]
    options = FederatedHarmonyOptions(n_clusters=2)
    expected, _ = by_sites(x, batch, groups, options)
    masks = [np.isin(batch, g) for g in groups]
    files = [tmp_path / f"site{i}.npz" for i in range(2)]
    for i, mask in enumerate(masks):
        np.savez(files[i], **HarmonySite(x[mask], batch[mask], options, seed=i).state())

    def ask(request):  # noqa: ANN001, ANN202
        replies = []
        for path in files:
            with np.load(path) as kept:
                site = HarmonySite.from_state({k: kept[k] for k in kept.files}, options)
            replies.append(answer(site, request))
            np.savez(path, **site.state())
        return replies

    harmony_rounds(ask, options)
    for path, mask in zip(files, masks, strict=True):
        with np.load(path) as kept:
            np.testing.assert_array_equal(kept["corrected"], expected[mask])
