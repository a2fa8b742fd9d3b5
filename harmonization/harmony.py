"""Harmony (Korsunsky et al. 2019, harmonypy) for low-dimensional embeddings, and LISI.

ComBat suits radiomic features, each with its own location and scale per scanner. Deep-feature
embeddings (e.g. a PCA of a CNN's penultimate layer) carry the scanner in directions shared by
many coordinates; Harmony clusters the embedding softly and removes each batch's offset within
each cluster. LISI (local inverse Simpson's index) says how mixed the batches are around each
point: 1 = only its own batch, the number of batches = perfectly mixed.

harmonypy is GPL-3.0 (see the README). This module runs where the embeddings are (a site, or
the in-process tools); a federated Harmony is not part of it yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.neighbors import NearestNeighbors

from common.errors import HarmonizationError


@dataclass(frozen=True)
class HarmonyOptions:
    """harmonypy's main knobs: diversity penalty ``theta``, clusters (None = harmonypy's
    default), iterations and the seed of its k-means start."""
    theta: float = 2.0
    n_clusters: int | None = None
    max_iter: int = 10
    seed: int = 0


def harmony_embeddings(embeddings: npt.ArrayLike, batch: Sequence[object],
                       options: HarmonyOptions = HarmonyOptions()
                       ) -> npt.NDArray[np.float64]:
    """Harmony-corrected embeddings, (n_samples, n_dims) like the input."""
    import harmonypy  # optional at the site: only embedding harmonization needs it

    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise HarmonizationError(
            f"embeddings must be a finite (n_samples, n_dims) array, got shape {x.shape}")
    labels = [str(b) for b in batch]
    if len(labels) != x.shape[0]:
        raise HarmonizationError(f"{len(labels)} batch labels for {x.shape[0]} embeddings")
    if len(set(labels)) < 2:
        raise HarmonizationError("Harmony needs two or more batches")
    result = harmonypy.run_harmony(
        x, pd.DataFrame({"batch": labels}), ["batch"], theta=options.theta,
        nclust=options.n_clusters, max_iter_harmony=options.max_iter,
        random_state=options.seed, verbose=False)
    corrected = np.asarray(result.Z_corr, dtype=np.float64)
    # harmonypy before 2.0 returned (n_dims, n_samples)
    return corrected if corrected.shape == x.shape else corrected.T


def lisi(embeddings: npt.ArrayLike, labels: Sequence[object], perplexity: float = 30.0
         ) -> npt.NDArray[np.float64]:
    """Local inverse Simpson's index of ``labels`` around each point, (n_samples,).
    As Korsunsky et al. define it: Gaussian weights over the ``3 * perplexity`` nearest
    neighbours, each point's bandwidth set by bisection so that the weights' perplexity is
    ``perplexity``; the index is 1 / sum over labels of (weight share of the label)^2.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    codes = np.unique(np.asarray([str(v) for v in labels]), return_inverse=True)[1]
    k = int(min(3 * perplexity, x.shape[0] - 1))
    if k < 1:
        raise HarmonizationError("LISI needs two or more points")
    distances, neighbours = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    distances, neighbours = distances[:, 1:] ** 2, neighbours[:, 1:]  # drop the point itself
    target = np.log(min(perplexity, k))
    out = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        weights = _perplexity_weights(distances[i], target)
        shares = np.bincount(codes[neighbours[i]], weights=weights, minlength=codes.max() + 1)
        out[i] = 1.0 / np.sum(shares**2)
    return out


def _perplexity_weights(d2: npt.NDArray[np.float64], target_entropy: float
                        ) -> npt.NDArray[np.float64]:
    """Normalized Gaussian weights exp(-beta d2) whose entropy is ``target_entropy``."""
    lo, hi, beta = 0.0, np.inf, 1.0
    shifted = d2 - d2.min()
    for _ in range(64):
        weights: npt.NDArray[np.float64] = np.exp(-beta * shifted)
        total = weights.sum()
        weights /= total
        entropy = -np.sum(weights[weights > 0] * np.log(weights[weights > 0]))
        if abs(entropy - target_entropy) < 1e-5:
            break
        if entropy > target_entropy:  # too flat: sharpen
            lo = beta
            beta = beta * 2.0 if hi == np.inf else (beta + hi) / 2.0
        else:
            hi = beta
            beta = (beta + lo) / 2.0
    return weights
