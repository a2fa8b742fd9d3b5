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

Privacy (``docs/privacy.md``): masses are soft counts; every embedding sum is over one
scanner's cells, weighted by membership, and one whose effective number of cells
(sum w)^2 / sum w^2 is under ``min_cell`` is withheld: that scanner is then left out of that
cluster's ridge (harmonypy leaves out a scanner with too small a share of a cluster the same
way). A scanner with fewer than ``min_cell`` embeddings takes no part and is named. The
releases are bounded by the options: one coreset, masses per k-means step, one set of ridge
sums per Harmony iteration.

:func:`federated_harmony` drives the halves in-process, as a study would through messages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from sklearn.cluster import KMeans

from common.errors import HarmonizationError

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


@dataclass(frozen=True)
class Coreset:
    """The sums (centres, dims) and sizes (centres,) of a site's own k-means clusters of
    cosine-normalized embeddings, each of at least ``min_cell`` cells."""
    sums: FloatArray
    counts: FloatArray

    AXES: ClassVar = {"sums": ("centres", "dims"), "counts": ("centres",)}


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
class HarmonyRequest:
    """What the server asks in a round: ``step`` is ``counts`` (the site's scanners),
    ``coreset`` (join the study's ``scanners`` and send a coreset for ``clusters``), ``start``
    (remove ``offsets`` when given, then memberships afresh against ``centroids``), ``cluster``
    (one membership update with the study's ``mass`` and the scanners' ``shares``) or
    ``ridge``."""
    step: str
    clusters: int = 0
    scanners: tuple[str, ...] = ()
    centroids: FloatArray | None = None
    mass: FloatArray | None = None
    shares: FloatArray | None = None
    offsets: FloatArray | None = None

    STEPS: ClassVar = ("counts", "coreset", "start", "cluster", "ridge")
    AXES: ClassVar = {"scanners": ("scanners",), "centroids": ("clusters", "dims"),
                      "mass": ("clusters",), "shares": ("scanners",),
                      "offsets": ("clusters", "scanners", "dims")}


Reply = ScannerCounts | Coreset | Masses | RidgeSums


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
    raise HarmonizationError(f"Harmony: unknown step '{request.step}' (one of "
                             f"{', '.join(HarmonyRequest.STEPS)})")


def _effective_cells(weights: FloatArray, axis: int = 0) -> FloatArray:
    """(sum w)^2 / sum w^2 along ``axis``: how many cells a weighted sum really averages."""
    squares = np.sum(weights**2, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(squares > 0, np.sum(weights, axis=axis) ** 2 / squares, 0.0)
    return np.asarray(out, dtype=np.float64)


def _normalize_rows(x: FloatArray) -> FloatArray:
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
        return _normalize_rows(self._corrected[self._kept])

    def coreset(self, n_clusters: int) -> Coreset:
        """Sums of this site's own k-means clusters (up to twice ``n_clusters``), each of at
        least ``min_cell`` cells: a smaller cluster's cells join the nearest larger one."""
        cells = self._cos
        floor = self.options.min_cell
        k = min(2 * n_clusters, cells.shape[0] // floor)
        if k < 1:
            return Coreset(np.zeros((0, cells.shape[1])), np.zeros(0))
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

    def _masses(self) -> Masses:
        r = self._r
        logs = np.where(r > 0, r * np.log(np.where(r > 0, r, 1.0)), 0.0)
        onehot = np.eye(len(self._columns))[self._codes]
        return Masses(mass=r.sum(axis=0), observed=np.asarray(r.T @ onehot, dtype=np.float64),
                      distance=float(np.sum(r * self._distance)),
                      entropy=float(self.options.sigma * logs.sum()))


@dataclass
class HarmonyServer:
    """The coordinator's half: the study's scanners, centroids, masses and ridge offsets."""
    options: FederatedHarmonyOptions
    scanners: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    counts: FloatArray = field(default_factory=lambda: np.zeros(0))
    centroids: FloatArray = field(default_factory=lambda: np.zeros((0, 0)))
    mass: FloatArray = field(default_factory=lambda: np.zeros(0))
    observed: FloatArray = field(default_factory=lambda: np.zeros((0, 0)))
    #: Each site's scanners' columns among the study's, in the order the sites answered.
    site_columns: list[IntArray] = field(default_factory=list)

    @property
    def shares(self) -> FloatArray:
        """Each scanner's share of the study's cells."""
        return np.asarray(self.counts / self.counts.sum(), dtype=np.float64)

    def study_scanners(self, parts: Sequence[ScannerCounts]) -> tuple[str, ...]:
        """The scanners with at least ``min_cell`` embeddings; the others are named in
        ``dropped`` and stay as they are."""
        counts: dict[str, int] = {}
        for part in parts:
            for name, n in zip(part.scanners, part.counts, strict=True):
                if name in counts:
                    raise HarmonizationError(f"Harmony: scanner '{name}' is at two sites")
                counts[name] = int(n)
        floor = self.options.min_cell
        self.scanners = tuple(sorted(s for s, n in counts.items() if n >= floor))
        self.dropped = tuple(sorted(s for s, n in counts.items() if n < floor))
        if len(self.scanners) < 2:
            raise HarmonizationError(
                f"Harmony needs two or more scanners of at least {floor} embeddings; has "
                f"{list(self.scanners)} (too few: {list(self.dropped)})")
        self.counts = np.asarray([counts[s] for s in self.scanners], dtype=np.float64)
        self.site_columns = [np.asarray([i for i, s in enumerate(self.scanners)
                                         if s in part.scanners], dtype=np.intp)
                             for part in parts]
        return self.scanners

    def n_clusters(self) -> int:
        """The option, or harmonypy's default min(N / 30, 100) (at least 2)."""
        if self.options.n_clusters is not None:
            return self.options.n_clusters
        return max(2, int(min(round(self.counts.sum() / 30.0), 100)))

    def start(self, parts: Sequence[Coreset], n_clusters: int) -> FloatArray:
        """The first centroids: k-means of the sites' cluster centres, weighted by size."""
        sums = np.concatenate([p.sums for p in parts])
        sizes = np.concatenate([p.counts for p in parts])
        if sums.shape[0] < n_clusters:
            raise HarmonizationError(
                f"Harmony: {sums.shape[0]} site clusters of at least {self.options.min_cell} "
                f"cells, fewer than the {n_clusters} clusters asked for")
        fit = KMeans(n_clusters=n_clusters, n_init=10, random_state=self.options.seed).fit(
            sums / sizes[:, None], sample_weight=sizes)
        self.centroids = _normalize_rows(np.asarray(fit.cluster_centers_, dtype=np.float64))
        return self.centroids

    def pool(self, parts: Sequence[Masses], columns: Sequence[IntArray]) -> float:
        """The study's masses from the sites'; returns harmonypy's k-means objective (distance,
        entropy and diversity terms, times 2000 / N)."""
        opts = self.options
        self.mass = np.sum([p.mass for p in parts], axis=0)
        self.observed = np.zeros((self.mass.shape[0], len(self.scanners)))
        for part, cols in zip(parts, columns, strict=True):
            self.observed[:, cols] = part.observed
        expected = np.outer(self.mass, self.shares)
        cross = self.observed * np.log((self.observed + expected + 1) / (2 * expected + 1))
        total = (sum(p.distance + p.entropy for p in parts)
                 + float(opts.sigma * opts.theta * cross.sum()))
        return total * 2000.0 / float(self.counts.sum())

    def diversity(self) -> float:
        """How mixed the scanners are within the clusters of the last memberships pooled: each
        cluster's inverse Simpson index of its scanners' masses, averaged with the clusters'
        masses as weights (1: each cluster holds one scanner; at most :attr:`ceiling`)."""
        shares = self.observed / np.maximum(self.observed.sum(axis=1, keepdims=True), 1e-300)
        return float(np.sum(self.mass / self.mass.sum() / np.sum(shares**2, axis=1)))

    @property
    def ceiling(self) -> float:
        """The index of clusters that hold every scanner in its share of the study's cells."""
        return float(1.0 / np.sum(self.shares**2))

    def offsets(self, parts: Sequence[RidgeSums], columns: Sequence[IntArray]) -> FloatArray:
        """Each scanner's offset per cluster (clusters, scanners, dims) from the ridge of the
        mixture of experts: the intercept unpenalized, each scanner's penalty ``alpha`` times
        its expected mass. A scanner withheld, or whose mass in the cluster is at most
        ``batch_prop_cutoff`` of its cells, is left out of that cluster (offset 0); a cluster
        left with under two scanners is not corrected. The intercepts, normalized, become the
        centroids."""
        opts = self.options
        k, b = self.observed.shape
        sums = np.zeros((k, b, parts[0].weighted.shape[2]))
        withheld = np.zeros((k, b), dtype=bool)
        for part, cols in zip(parts, columns, strict=True):
            sums[:, cols] = part.weighted
            withheld[:, cols] = part.withheld
        expected = np.outer(self.mass, self.shares)
        out = np.zeros_like(sums)
        centroids = self.centroids.copy()
        for c in range(k):
            keep = ~withheld[c] & (self.observed[c] / self.counts > opts.batch_prop_cutoff)
            if keep.sum() < 2:
                continue
            o = self.observed[c, keep]
            design = np.diag(np.concatenate([[o.sum()], o + opts.alpha * expected[c, keep]]))
            design[0, 1:] = design[1:, 0] = o
            target = np.vstack([sums[c, keep].sum(axis=0), sums[c, keep]])
            weights = np.linalg.solve(design, target)
            centroids[c] = weights[0]
            out[c, keep] = weights[1:]
        self.centroids = _normalize_rows(centroids)
        return out


@dataclass(frozen=True)
class HarmonyTrace:
    """What the server learns from a run: the study's scanners and those left out, the
    clusters, the iterations and their objective, the message rounds and the bytes each site
    sent, and the scanners' mixing within the clusters (:meth:`HarmonyServer.diversity`)
    before and after, with its ceiling."""
    scanners: tuple[str, ...]
    dropped: tuple[str, ...]
    n_clusters: int
    iterations: int
    objective: list[float]
    rounds: int
    sent_bytes: tuple[int, ...]
    diversity_before: float
    diversity_after: float
    diversity_ceiling: float


@dataclass(frozen=True)
class HarmonyResult:
    """Each site's corrected embeddings, with the server's :class:`HarmonyTrace`."""
    corrected: list[FloatArray]
    trace: HarmonyTrace

    @property
    def dropped(self) -> tuple[str, ...]:
        return self.trace.dropped


#: harmonypy's window of k-means objectives compared for convergence.
WINDOW = 3


def harmony_rounds(ask: Callable[[HarmonyRequest], Sequence[Reply]],
                   options: FederatedHarmonyOptions) -> HarmonyTrace:
    """The server's side of a run, in harmonypy's order: ``ask`` sends a request to every
    site and returns their replies in the same site order each time. The last request is a
    ``start`` that carries the last offsets, so every site ends with its corrected
    embeddings (and the server with the memberships of them)."""
    sent: list[int] = []
    rounds = 0

    def gather(request: HarmonyRequest) -> list[Any]:
        nonlocal rounds, sent
        replies = list(ask(request))
        rounds += 1
        sizes = [sum(np.asarray(v).nbytes for v in vars(r).values()) for r in replies]
        sent = [a + b for a, b in zip(sent or [0] * len(sizes), sizes, strict=True)]
        return replies

    server = HarmonyServer(options)
    scanners = server.study_scanners(gather(HarmonyRequest("counts")))
    k = server.n_clusters()
    server.start(gather(HarmonyRequest("coreset", clusters=k, scanners=scanners)), k)
    columns = server.site_columns
    objective = [server.pool(gather(HarmonyRequest("start", centroids=server.centroids)),
                             columns)]
    before = server.diversity()
    offsets: FloatArray | None = None
    iterations = 0
    while iterations < options.max_iter_harmony:
        iterations += 1
        if offsets is not None:  # memberships afresh from the corrected embeddings
            server.pool(gather(HarmonyRequest("start", centroids=server.centroids,
                                              offsets=offsets)), columns)
        kmeans: list[float] = []
        for step in range(options.max_iter_kmeans):
            parts = gather(HarmonyRequest("cluster", mass=server.mass, shares=server.shares))
            kmeans.append(server.pool(parts, columns))
            if step > WINDOW and abs(_fall(kmeans, WINDOW)) < options.epsilon_cluster:
                break
        objective.append(kmeans[-1])
        offsets = server.offsets(gather(HarmonyRequest("ridge")), columns)
        if 0.0 <= _fall(objective, 1) < options.epsilon_harmony:
            break
    server.pool(gather(HarmonyRequest("start", centroids=server.centroids, offsets=offsets)),
                columns)
    return HarmonyTrace(scanners, server.dropped, k, iterations, objective, rounds, tuple(sent),
                        before, server.diversity(), server.ceiling)


def federated_harmony(embeddings: Sequence[npt.ArrayLike], scanners: Sequence[Sequence[object]],
                      options: FederatedHarmonyOptions = FederatedHarmonyOptions()
                      ) -> HarmonyResult:
    """Harmony over sites, in-process: ``embeddings[i]`` and ``scanners[i]`` are site i's.
    The sites and the server exchange only the messages above (:func:`harmony_rounds`)."""
    sites = [HarmonySite(x, s, options, seed=i)
             for i, (x, s) in enumerate(zip(embeddings, scanners, strict=True))]
    trace = harmony_rounds(lambda request: [answer(site, request) for site in sites], options)
    return HarmonyResult([site.corrected for site in sites], trace)


def _fall(values: Sequence[float], window: int) -> float:
    """The relative fall of the sum of the last ``window`` values from the sum of the
    ``window`` before them (shifted by one), which harmonypy tests for convergence: k-means
    steps converge when its size is under ``epsilon_cluster``; Harmony iterations when it is
    from 0 to ``epsilon_harmony`` (harmonypy 2.1 goes on after a rise: its traces show it)."""
    old = sum(values[-1 - window:-1])
    return (old - sum(values[-window:])) / abs(old)
