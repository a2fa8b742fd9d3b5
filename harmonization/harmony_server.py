"""Federated Harmony, the server's half (:mod:`harmonization.federated_harmony` is the sites'
half and the messages): the study's scanners, the start from the sites' coresets, the pooled
masses and objective, each cluster's ridge, harmonypy's stopping rules, and the order of the
rounds (:func:`harmony_rounds`, over any transport); :func:`federated_harmony` runs a whole
study in-process."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from common.errors import HarmonizationError
from harmonization.federated_harmony import (
    Coreset,
    FederatedHarmonyOptions,
    FloatArray,
    HarmonyRequest,
    HarmonySite,
    IntArray,
    Masses,
    Reply,
    RidgeSums,
    ScannerCounts,
    answer,
    normalize_rows,
)


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
        from sklearn.cluster import KMeans  # loaded on use, as at the sites

        fit = KMeans(n_clusters=n_clusters, n_init=10, random_state=self.options.seed).fit(
            sums / sizes[:, None], sample_weight=sizes)
        self.centroids = normalize_rows(np.asarray(fit.cluster_centers_, dtype=np.float64))
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
        self.centroids = normalize_rows(centroids)
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

    def request(step: str, **arrays: FloatArray | None) -> HarmonyRequest:
        return HarmonyRequest(step, clusters=k, **arrays)  # type: ignore[arg-type]

    server.start(gather(HarmonyRequest("coreset", clusters=k, scanners=scanners)), k)
    columns = server.site_columns
    objective = [server.pool(gather(request("start", centroids=server.centroids)), columns)]
    before = server.diversity()
    offsets: FloatArray | None = None
    iterations = 0
    while iterations < options.max_iter_harmony:
        iterations += 1
        if offsets is not None:  # memberships afresh from the corrected embeddings
            server.pool(gather(request("start", centroids=server.centroids, offsets=offsets)),
                        columns)
        kmeans: list[float] = []
        for step in range(options.max_iter_kmeans):
            parts = gather(request("cluster", mass=server.mass, shares=server.shares))
            kmeans.append(server.pool(parts, columns))
            if step > WINDOW and abs(_fall(kmeans, WINDOW)) < options.epsilon_cluster:
                break
        objective.append(kmeans[-1])
        offsets = server.offsets(gather(request("ridge")), columns)
        if 0.0 <= _fall(objective, 1) < options.epsilon_harmony:
            break
    server.pool(gather(request("start", centroids=server.centroids, offsets=offsets)), columns)
    return HarmonyTrace(scanners, server.dropped, k, iterations, objective, rounds, tuple(sent),
                        before, server.diversity(), server.ceiling)


def federated_harmony(embeddings: Sequence[npt.ArrayLike], scanners: Sequence[Sequence[object]],
                      options: FederatedHarmonyOptions | None = None) -> HarmonyResult:
    """Harmony over sites, in-process: ``embeddings[i]`` and ``scanners[i]`` are site i's.
    The sites and the server exchange only the messages (:func:`harmony_rounds`); the
    options default to harmonypy's."""
    options = options or FederatedHarmonyOptions()
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
