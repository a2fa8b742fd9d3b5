"""Harmony (Korsunsky et al., Nature Methods 2019) split so that embeddings never leave a site.

Harmony alternates a soft k-means with a diversity penalty (a scanner's cells that crowd a
cluster are pushed towards other clusters) and a mixture-of-experts ridge correction (within
each cluster, each scanner's offset is regressed out, weighted by the cells' soft membership).
This follows harmonypy 2 (the R package harmony2's algorithm), step by step; what couples the
cells is a few sums:

* the diversity penalty needs, per cluster, each scanner's membership mass (``observed``, held
  whole by the scanner's site) and the study's (the expected mass of a scanner is the study's
  mass times the scanner's share of the cells): :class:`Masses`, clusters x site scanners;
* the ridge of cluster k needs, per scanner, its membership mass and its cells' embeddings
  summed with their membership as weights (:class:`RidgeSums`, clusters x site scanners x
  dims). The design matrix is made of the masses alone, so the server solves each cluster's
  ridge and sends back every scanner's offset; the intercepts are the next centroids.

harmonypy updates the memberships in random blocks of 5% of the cells, each block seeing the
others' latest masses. Here each site updates its own cells in such blocks, its own scanners'
masses exact and current (a scanner belongs to one site) and the other sites' part of each
cluster's mass as of the last round: the only departure from the pooled algorithm besides the
start. harmonypy starts from k-means++ on the pooled cells; here each site sends the sums of its
own k-means clusters of at least ``min_cell`` cells and the server clusters their centres,
weighted by their sizes. ``tests/harmonization/test_federated_harmony.py`` and
``bench/harmony.py`` measure the result against harmonypy on the pooled embeddings.

Privacy (``docs/explanation/privacy.md``): masses are soft counts; every embedding sum is over
one scanner's cells, weighted by membership, and one whose effective number of cells
(sum w)^2 / sum w^2 is under ``min_cell`` is withheld: that scanner is then left out of that
cluster's ridge (harmonypy leaves out a scanner with too small a share of a cluster the same
way). A scanner with fewer than ``min_cell`` embeddings takes no part and is named. The
releases are bounded by the options: one coreset, masses per k-means step, one set of ridge
sums per Harmony iteration.

This module is the sites' half and the messages; :mod:`harmonization.harmony_server` is the
server's, and :func:`harmonization.harmony_server.federated_harmony` drives both in-process, as a
study does through messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from common.errors import HarmonizationError

if TYPE_CHECKING:
    from common.protocol import EmbeddingHarmonySpec

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]


@dataclass(frozen=True)
class FederatedHarmonyOptions:
    """harmonypy's parameters with its defaults (``n_clusters`` None: min(N / 30, 100)), and
    the privacy floor ``min_cell``."""
    theta: float = 2.0
    sigma: float = 0.1
    n_clusters: int | None = None
    max_iter_harmony: int = 10
    max_iter_kmeans: int = 4
    epsilon_cluster: float = 1e-3
    epsilon_harmony: float = 1e-2
    alpha: float = 0.2
    block_size: float = 0.05
    batch_prop_cutoff: float = 1e-5
    min_cell: int = 5
    seed: int = 0

    @classmethod
    def of(cls, spec: EmbeddingHarmonySpec, seed: int, min_cell: int
           ) -> FederatedHarmonyOptions:
        """The protocol's ``harmonization.embeddings``, with the study ``seed`` and the floor
        ``min_cell`` of whoever runs it (a site's own, the server's)."""
        return cls(theta=spec.theta, sigma=spec.sigma, n_clusters=spec.n_clusters,
                   max_iter_harmony=spec.max_iter_harmony, max_iter_kmeans=spec.max_iter_kmeans,
                   min_cell=min_cell, seed=seed)

    def __post_init__(self) -> None:
        if self.theta < 0 or self.sigma <= 0 or self.alpha < 0:
            raise HarmonizationError("Harmony: theta and alpha must be >= 0 and sigma > 0")
        if not 0 < self.block_size <= 1:
            raise HarmonizationError(f"Harmony: block_size {self.block_size} is not in (0, 1]")
        if self.max_iter_harmony < 1 or self.max_iter_kmeans < 1 or self.min_cell < 1:
            raise HarmonizationError("Harmony: iterations and min_cell must be at least 1")


@dataclass(frozen=True)
class ScannerCounts:
    """A site's first message: how many embeddings each of its scanners has."""
    scanners: tuple[str, ...]
    counts: IntArray

    AXES: ClassVar = {"scanners": ("site_scanners",), "counts": ("site_scanners",)}
    COUNTS: ClassVar = {"counts": "min_patients"}


@dataclass(frozen=True)
class Coreset:
    """The sums (centres, dims) and sizes (centres,) of a site's own k-means clusters of
    cosine-normalized embeddings, each of at least ``min_cell`` cells."""
    sums: FloatArray
    counts: FloatArray

    AXES: ClassVar = {"sums": ("centres", "dims"), "counts": ("centres",)}
    COUNTS: ClassVar = {"counts": "min_patients"}


@dataclass(frozen=True)
class Masses:
    """A site's answer to a membership update: per cluster its membership mass (clusters,)
    and its scanners' (clusters, site scanners), and its terms of the k-means objective."""
    mass: FloatArray
    observed: FloatArray
    distance: float
    entropy: float

    AXES: ClassVar = {"mass": ("clusters",), "observed": ("clusters", "site_scanners")}


@dataclass(frozen=True)
class RidgeSums:
    """Per cluster and site scanner, the membership-weighted sum of the embeddings (clusters,
    site scanners, dims), zero and ``withheld`` where fewer than ``min_cell`` effective cells."""
    weighted: FloatArray
    withheld: npt.NDArray[np.bool_]

    AXES: ClassVar = {"weighted": ("clusters", "site_scanners", "dims"),
                      "withheld": ("clusters", "site_scanners")}


@dataclass(frozen=True)
class SiteMixing:
    """A site's own check of Harmony (the last round): the mean LISI of its scanners among
    its embeddings before and after, 1 at a site with one scanner (LISI needs every
    embedding's neighbours, so only a site can compute it, over its own)."""
    scanners: int
    before: float
    after: float


@dataclass(frozen=True)
class HarmonyRequest:
    """What the server asks in a round: ``step`` is ``counts`` (the site's scanners),
    ``coreset`` (join the study's ``scanners`` and send a coreset for ``clusters``), ``start``
    (remove ``offsets`` when given, then memberships afresh against ``centroids``), ``cluster``
    (one membership update with the study's ``mass`` and the scanners' ``shares``) or
    ``ridge``; ``mixing`` asks for the site's :class:`SiteMixing`."""
    step: str
    clusters: int = 0
    scanners: tuple[str, ...] = ()
    centroids: FloatArray | None = None
    mass: FloatArray | None = None
    shares: FloatArray | None = None
    offsets: FloatArray | None = None

    STEPS: ClassVar = ("counts", "coreset", "start", "cluster", "ridge", "mixing")
    AXES: ClassVar = {"scanners": ("scanners",), "centroids": ("clusters", "dims"),
                      "mass": ("clusters",), "shares": ("scanners",),
                      "offsets": ("clusters", "scanners", "dims")}


Reply = ScannerCounts | Coreset | Masses | RidgeSums | SiteMixing
#: The name each reply travels under, and the step whose reply it is.
REPLY_NAMES: dict[type, str] = {ScannerCounts: "counts", Coreset: "coreset", Masses: "masses",
                                RidgeSums: "ridge", SiteMixing: "mixing"}
STEP_REPLIES: dict[str, type] = {"counts": ScannerCounts, "coreset": Coreset, "start": Masses,
                                 "cluster": Masses, "ridge": RidgeSums, "mixing": SiteMixing}


def answer(site: HarmonySite, request: HarmonyRequest) -> Reply:
    """A site's reply to one of the server's requests; a request missing what its step needs
    is refused by name."""
    def need(value: FloatArray | None, name: str) -> FloatArray:
        if value is None:
            raise HarmonizationError(f"Harmony: a '{request.step}' request without '{name}'")
        return value

    if request.step == "counts":
        return site.scanner_counts()
    if request.step == "coreset":
        site.join(request.scanners)
        return site.coreset(request.clusters)
    if request.step == "start":
        if request.offsets is not None:
            site.correct(request.offsets)
        return site.start(need(request.centroids, "centroids"))
    if request.step == "cluster":
        return site.cluster(need(request.mass, "mass"), need(request.shares, "shares")[
            site.columns])
    if request.step == "ridge":
        return site.ridge()
    if request.step == "mixing":
        return site.mixing()
    raise HarmonizationError(f"Harmony: unknown step '{request.step}' (one of "
                             f"{', '.join(HarmonyRequest.STEPS)})")


def _effective_cells(weights: FloatArray, axis: int = 0) -> FloatArray:
    """(sum w)^2 / sum w^2 along ``axis``: how many cells a weighted sum really averages."""
    squares = np.sum(weights**2, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(squares > 0, np.sum(weights, axis=axis) ** 2 / squares, 0.0)
    return np.asarray(out, dtype=np.float64)


def normalize_rows(x: FloatArray) -> FloatArray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float64)


class HarmonySite:
    """One site's half: it holds its embeddings, their scanners and memberships, and answers
    each round with sums only."""

    def __init__(self, embeddings: npt.ArrayLike, scanners: Sequence[object],
                 options: FederatedHarmonyOptions = FederatedHarmonyOptions(), seed: int = 0):
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0 or not np.all(np.isfinite(x)):
            raise HarmonizationError(
                f"Harmony: embeddings must be a finite (cells, dims) array, got {x.shape}")
        labels = np.asarray([str(s) for s in scanners])
        if labels.shape[0] != x.shape[0]:
            raise HarmonizationError(
                f"Harmony: {labels.shape[0]} scanner labels for {x.shape[0]} embeddings")
        self.options = options
        self._z = x
        self._labels = labels
        self._rng = np.random.default_rng([options.seed, seed])
        self._corrected = x.copy()
        self._kept = np.zeros(x.shape[0], dtype=bool)  # cells of scanners in the study
        self._codes = np.zeros(0, dtype=np.intp)  # kept cells' column among own scanners
        self._columns = np.zeros(0, dtype=np.intp)  # own scanners' columns in the study
        self._r = np.zeros((0, 0))
        self._distance = np.zeros((0, 0))

    @property
    def corrected(self) -> FloatArray:
        """The embeddings after Harmony (a dropped scanner's as they came)."""
        return self._corrected.copy()

    def scanner_counts(self) -> ScannerCounts:
        """Each own scanner's number of embeddings, 0 where under ``min_cell`` (the server
        names the scanner as left out; its count does not leave)."""
        names, counts = np.unique(self._labels, return_counts=True)
        counts[counts < self.options.min_cell] = 0
        return ScannerCounts(tuple(str(n) for n in names), counts.astype(np.intp))

    def state(self) -> dict[str, npt.NDArray[Any]]:
        """Everything this site holds between rounds (kept at the site, never sent)."""
        return {"z": self._z, "labels": self._labels, "corrected": self._corrected,
                "kept": self._kept, "codes": self._codes, "columns": self._columns,
                "r": self._r, "distance": self._distance,
                "rng": np.asarray(json.dumps(self._rng.bit_generator.state))}

    @classmethod
    def from_state(cls, state: Mapping[str, npt.NDArray[Any]],
                   options: FederatedHarmonyOptions) -> HarmonySite:
        """The site as :meth:`state` kept it."""
        site = cls(state["z"], state["labels"].tolist(), options)
        site._corrected = np.asarray(state["corrected"], dtype=np.float64)
        site._kept = np.asarray(state["kept"], dtype=bool)
        site._codes = np.asarray(state["codes"], dtype=np.intp)
        site._columns = np.asarray(state["columns"], dtype=np.intp)
        site._r = np.asarray(state["r"], dtype=np.float64)
        site._distance = np.asarray(state["distance"], dtype=np.float64)
        site._rng.bit_generator.state = json.loads(str(state["rng"]))
        return site

    def join(self, study_scanners: Sequence[str]) -> None:
        """Take part with the cells of the study's scanners (the others are left as they are)."""
        own = [s for s in study_scanners if s in set(self._labels)]
        self._columns = np.asarray([list(study_scanners).index(s) for s in own], dtype=np.intp)
        self._kept = np.isin(self._labels, own)
        lookup = {s: i for i, s in enumerate(own)}
        self._codes = np.asarray([lookup[s] for s in self._labels[self._kept]], dtype=np.intp)

    @property
    def columns(self) -> IntArray:
        """This site's scanners' columns among the study's."""
        return self._columns

    @property
    def cells(self) -> int:
        """How many of its embeddings take part."""
        return int(self._kept.sum())

    @property
    def _cos(self) -> FloatArray:
        return normalize_rows(self._corrected[self._kept])

    def coreset(self, n_clusters: int) -> Coreset:
        """Sums of this site's own k-means clusters (up to twice ``n_clusters``), each of at
        least ``min_cell`` cells: a smaller cluster's cells join the nearest larger one."""
        cells = self._cos
        floor = self.options.min_cell
        k = min(2 * n_clusters, cells.shape[0] // floor)
        if k < 1:
            return Coreset(np.zeros((0, cells.shape[1])), np.zeros(0))
        from sklearn.cluster import KMeans  # the guard imports these messages: load on use

        fit = KMeans(n_clusters=k, n_init=10, random_state=self.options.seed).fit(cells)
        labels = np.asarray(fit.labels_, dtype=np.intp)
        sizes = np.bincount(labels, minlength=k)
        big = np.flatnonzero(sizes >= floor)
        if big.size == 0:  # k = 1 leaves one cluster of every cell, at least the floor
            big = np.asarray([int(np.argmax(sizes))])
        centres = np.asarray(fit.cluster_centers_, dtype=np.float64)[big]
        labels = big[np.argmin(((cells[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)] \
            if big.size < k else labels
        sums = np.stack([cells[labels == c].sum(axis=0) for c in big])
        counts = np.asarray([np.sum(labels == c) for c in big], dtype=np.float64)
        return Coreset(np.asarray(sums, dtype=np.float64), counts)

    def start(self, centroids: FloatArray) -> Masses:
        """Memberships from scratch against ``centroids`` (clusters, dims): a softmax of the
        distances without the diversity penalty, as harmonypy starts each iteration."""
        self._distance = 2.0 * (1.0 - self._cos @ centroids.T)
        r = np.exp(-self._distance / self.options.sigma)
        self._r = r / r.sum(axis=1, keepdims=True)
        return self._masses()

    def cluster(self, mass: FloatArray, shares: FloatArray) -> Masses:
        """One membership update in random blocks, as harmonypy's: the study's ``mass`` per
        cluster from the last round and this site's scanners' ``shares`` of the study's cells
        give each scanner's expected mass."""
        opts = self.options
        scaled = np.exp(-self._distance / opts.sigma)
        scaled /= scaled.sum(axis=1, keepdims=True)
        r = self._r
        own = r.sum(axis=0)
        others = np.maximum(mass - own, 0.0)
        onehot = np.eye(len(self._columns))[self._codes]  # cells x own scanners
        observed = r.T @ onehot  # clusters x own scanners
        n = r.shape[0]
        blocks = int(np.ceil(1.0 / opts.block_size))
        per_block = max(1, int(n * opts.block_size))
        order = self._rng.permutation(n)
        for i in range(blocks):
            block = order[i * per_block:] if i == blocks - 1 else \
                order[i * per_block:(i + 1) * per_block]
            if block.size == 0:
                break
            own -= r[block].sum(axis=0)
            observed -= r[block].T @ onehot[block]
            expected = np.outer(others + own, shares)
            penalty = ((2 * expected + 1) / (observed + expected + 1)) ** opts.theta
            new = scaled[block] * penalty[:, self._codes[block]].T
            r[block] = new / new.sum(axis=1, keepdims=True)
            own += r[block].sum(axis=0)
            observed += r[block].T @ onehot[block]
        self._r = r
        return self._masses()

    def ridge(self) -> RidgeSums:
        """Per cluster and own scanner, the membership-weighted sum of the embeddings."""
        z = self._z[self._kept]
        k, s = self._r.shape[1], len(self._columns)
        weighted = np.zeros((k, s, z.shape[1]))
        withheld = np.zeros((k, s), dtype=bool)
        for j in range(s):
            w = self._r[self._codes == j]  # cells of scanner j x clusters
            weighted[:, j] = w.T @ z[self._codes == j]
            withheld[:, j] = _effective_cells(w) < self.options.min_cell
        weighted[withheld] = 0.0
        return RidgeSums(weighted, withheld)

    def correct(self, offsets: FloatArray) -> None:
        """Remove each own scanner's offset per cluster (``offsets``: clusters, study scanners,
        dims), weighted by the cells' memberships."""
        shift = np.einsum("ck,kcd->cd", self._r, offsets[:, self._columns[self._codes]])
        self._corrected[self._kept] = self._z[self._kept] - shift

    def mixing(self) -> SiteMixing:
        """This site's scanners' mean LISI among its own embeddings taking part, before and
        after (perplexity 30, or a third of its embeddings where fewer)."""
        from harmonization.harmony import lisi  # scikit-learn: loaded on use, as KMeans

        labels = self._labels[self._kept]
        if len(set(labels.tolist())) < 2:
            return SiteMixing(len(set(labels.tolist())), 1.0, 1.0)
        perplexity = max(2.0, min(30.0, (labels.size - 1) / 3.0))
        before = lisi(self._z[self._kept], labels.tolist(), perplexity)
        after = lisi(self._corrected[self._kept], labels.tolist(), perplexity)
        return SiteMixing(len(set(labels.tolist())), float(before.mean()), float(after.mean()))

    def _masses(self) -> Masses:
        r = self._r
        logs = np.where(r > 0, r * np.log(np.where(r > 0, r, 1.0)), 0.0)
        onehot = np.eye(len(self._columns))[self._codes]
        return Masses(mass=r.sum(axis=0), observed=np.asarray(r.T @ onehot, dtype=np.float64),
                      distance=float(np.sum(r * self._distance)),
                      entropy=float(self.options.sigma * logs.sum()))
