"""IBSI-1 features that pyradiomics does not compute, by the project (the protocol's ``ibsi``
feature class).

Each feature is named by its IBSI tag without the dimension suffix (``dzm_sde``, ``ih_mode``,
``morph_comp_1``) and follows the definitions of the IBSI reference manual (Zwanenburg et al.,
arXiv:1612.07003, chapter 3). They are tested against the IBSI consensus values on the digital
phantom (``tests/client/test_ibsi.py``, ``myelofed ibsi-check``):

* morphology: compactness 1 and 2, spherical disproportion, asphericity, centre-of-mass shift,
  integrated intensity, volume and area densities of the axis-aligned bounding box, of the
  approximate enclosing ellipsoid and of the convex hull, Moran's I and Geary's C;
* local intensity: local and global intensity peak (mean in a 1 cm3 sphere);
* intensity statistics: median absolute deviation, coefficient of variation, quartile
  coefficient of dispersion;
* the intensity histogram, on the discretised grey levels (23 features);
* the intensity-volume histogram (V10, V90, I10, I90 and their differences), under its own
  discretization (the protocol's ``ivh_discretization``: none, bin size, bin number);
* the grey level distance zone matrix (16 features);
* the NGLDM features pyradiomics' GLDM lacks: normalised grey level non-uniformity, dependence
  count percentage and dependence count energy.

Texture matrices (distance zones, NGLDM) follow the protocol's dimension: 3D, 2.5D (matrices of
every slice merged) or 2D (features of every slice, averaged over slices).

Longer than 400 lines: one IBSI chapter, each family a short function over the same arrays;
splitting it would scatter the definitions a reader checks side by side against the manual.

Bounded work: Moran's I and Geary's C are sums over every pair of ROI voxels, computed exactly by
FFT convolution over the ROI's bounding box up to ``MAX_AUTOCORRELATION_BOX`` voxels and, past
it, over an evenly strided subset of ``MAX_PAIRWISE_VOXELS`` ROI voxels (the same subset on
every run); the local peak's sphere mean runs on the ROI's bounding box only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
from scipy import ndimage, signal, spatial, special
from skimage import measure

from common.protocol import IBSI_FEATURES

Dimension = Literal["3D", "2.5D", "2D"]

#: Moran's I and Geary's C are exact (FFT) while the ROI's bounding box holds at most this many
#: voxels (peak memory about 1.3 kB per box voxel); past it they use a strided subset of
#: ``MAX_PAIRWISE_VOXELS`` ROI voxels.
MAX_AUTOCORRELATION_BOX = 500_000
MAX_PAIRWISE_VOXELS = 8000

#: Radius of a 1 cm3 sphere, in mm (the local intensity peak's neighbourhood).
PEAK_RADIUS_MM = (3 * 1000 / (4 * math.pi)) ** (1 / 3)


def compute(image: np.ndarray, morph_mask: np.ndarray, intensity_mask: np.ndarray,
            grey_levels: np.ndarray, spacing_zyx: tuple[float, float, float],
            dimension: Dimension = "3D", ngldm_alpha: int = 0,
            names: tuple[str, ...] = (),
            ivh: tuple[np.ndarray, float, float] | None = None) -> dict[str, float]:
    """The ``ibsi`` class's features of one case, tag -> value.

    Parameters
    ----------
    image
        Intensities (z, y, x), after the project's standardization.
    morph_mask, intensity_mask
        Boolean masks on the same grid: before and after re-segmentation.
    grey_levels
        The discretised image (integers from 1), valid inside ``intensity_mask``.
    spacing_zyx
        Voxel spacing in mm, in array order.
    dimension
        ``3D``, ``2.5D`` or ``2D`` (slices along the first axis) for the texture matrices.
    names
        The features to return (empty = all).
    ivh
        The intensity-volume histogram's intensities of the ROI voxels and the range its
        intensity fractions span (IBSI's IVH discretization); default: the grey levels and
        their range.
    """
    wanted = set(names or IBSI_FEATURES)
    spacing = np.asarray(spacing_zyx, dtype=float)
    values = image[intensity_mask].astype(np.float64)
    levels = grey_levels[intensity_mask].astype(np.int64)
    out: dict[str, float] = {}
    groups: list[tuple[str, Callable[[], dict[str, float]]]] = [
        ("morph_", lambda: _morphology(image, morph_mask, intensity_mask, spacing, wanted)),
        ("loc_", lambda: _local_peaks(image, intensity_mask, spacing)),
        ("stat_", lambda: _dispersion(values, "stat_")),
        ("ih_", lambda: _histogram(levels)),
        ("ivh_", lambda: _intensity_volume(*(ivh or (levels.astype(np.float64),
                                                    float(levels.min()), float(levels.max()))))),
        ("dzm_", lambda: _mean_over(_slices(dimension, morph_mask, intensity_mask, grey_levels),
                                    _distance_zone_matrix, _zone_features)),
        ("ngl_", lambda: _mean_over(_slices(dimension, morph_mask, intensity_mask, grey_levels),
                                    lambda _, i, g, in_plane: _ngldm(i, g, in_plane, ngldm_alpha),
                                    _dependence_features)),
    ]
    with np.errstate(divide="ignore", invalid="ignore"):  # undefined features are NaN
        for prefix, family in groups:
            if any(name.startswith(prefix) for name in wanted):
                out.update(family())
    return {name: float(out[name]) for name in IBSI_FEATURES if name in wanted}


# --- morphology ---------------------------------------------------------------------------------

def _mesh(mask: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Marching-cubes mesh of the mask (IBSI 3.1): vertices (mm), volume and surface area."""
    padded = np.pad(mask, 1).astype(np.float32)
    verts, faces, _, _ = measure.marching_cubes(padded, level=0.5, spacing=tuple(spacing))
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    volume = abs(float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum()) / 6.0)
    area = float(measure.mesh_surface_area(verts, faces))
    return verts, volume, area


def _positions(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).astype(np.float64) * spacing


def _ellipsoid_area(a: float, b: float, c: float) -> float:
    """Surface area of an ellipsoid with semi-axes a >= b >= c (IBSI 3.1.17: a Legendre series
    of 20 terms)."""
    alpha = math.sqrt(max(0.0, 1 - b * b / (a * a)))
    beta = math.sqrt(max(0.0, 1 - c * c / (a * a)))
    if alpha * beta < 1e-12:
        return 4 * math.pi * a * b
    x = (alpha ** 2 + beta ** 2) / (2 * alpha * beta)
    total = sum((alpha * beta) ** nu / (1 - 4 * nu * nu) * special.eval_legendre(nu, x)
                for nu in range(21))
    return 4 * math.pi * a * b * float(total)


def _morphology(image: np.ndarray, morph: np.ndarray, intensity: np.ndarray,
                spacing: np.ndarray, wanted: set[str]) -> dict[str, float]:
    verts, volume, area = _mesh(morph, spacing)
    out = {
        "morph_comp_1": volume / (math.sqrt(math.pi) * area ** 1.5),
        "morph_comp_2": 36 * math.pi * volume ** 2 / area ** 3,
        "morph_sph_dispr": area / (36 * math.pi * volume ** 2) ** (1 / 3),
    }
    out["morph_asphericity"] = out["morph_sph_dispr"] - 1
    positions = _positions(morph, spacing)
    weights = image[intensity].astype(np.float64)
    weighted = _positions(intensity, spacing)
    out["morph_com"] = float(np.linalg.norm(
        positions.mean(axis=0) - (weighted * weights[:, None]).sum(axis=0) / weights.sum()))
    out["morph_integ_int"] = volume * float(weights.mean())

    extent = verts.max(axis=0) - verts.min(axis=0)
    out["morph_vol_dens_aabb"] = volume / float(np.prod(extent))
    out["morph_area_dens_aabb"] = area / float(
        2 * (extent[0] * extent[1] + extent[0] * extent[2] + extent[1] * extent[2]))

    # IBSI's consensus values use the sample covariance (N - 1) of the voxel centres.
    eigen = (np.sort(np.linalg.eigvalsh(np.cov(positions.T)))[::-1] if len(positions) > 1
             else np.full(3, math.nan))
    a, b, c = (2 * math.sqrt(max(v, 0.0)) for v in eigen)
    out["morph_pca_maj_axis"], out["morph_pca_min_axis"], out["morph_pca_least_axis"] = (
        2 * a, 2 * b, 2 * c)
    out["morph_vol_dens_aee"] = 3 * volume / (4 * math.pi * a * b * c) if c > 0 else math.nan
    out["morph_area_dens_aee"] = area / _ellipsoid_area(a, b, c) if c > 0 else math.nan

    try:
        hull = spatial.ConvexHull(verts)
        out["morph_vol_dens_conv_hull"] = volume / hull.volume
        out["morph_area_dens_conv_hull"] = area / hull.area
    except spatial.QhullError:  # a flat ROI has no 3D hull
        out["morph_vol_dens_conv_hull"] = out["morph_area_dens_conv_hull"] = math.nan

    if {"morph_moran_i", "morph_geary_c"} & wanted:
        out.update(_autocorrelation(weighted, weights, intensity, image, spacing))
    return out


def _autocorrelation(positions: np.ndarray, values: np.ndarray, mask: np.ndarray,
                     image: np.ndarray, spacing: np.ndarray) -> dict[str, float]:
    """Moran's I and Geary's C over every pair of ROI voxels, weighted by inverse distance (IBSI
    3.1.28-29). The pair sums are convolutions of the ROI's values with the 1/distance kernel,
    done by FFT over the ROI's bounding box (exact); a box over ``MAX_AUTOCORRELATION_BOX``
    voxels uses an evenly strided subset of ``MAX_PAIRWISE_VOXELS`` ROI voxels instead."""
    n = len(values)
    mean = values.mean()
    denominator = float(((values - mean) ** 2).sum())
    if n < 2 or denominator == 0:
        return {"morph_moran_i": math.nan, "morph_geary_c": math.nan}
    where = np.argwhere(mask)
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(where.min(axis=0), where.max(axis=0),
                                                     strict=True))
    inside = mask[box]
    if inside.size <= MAX_AUTOCORRELATION_BOX:
        grids = np.meshgrid(*(np.arange(-(k - 1), k) * s for k, s in zip(inside.shape, spacing,
                                                                        strict=True)),
                            indexing="ij")
        distance = np.sqrt(sum(g ** 2 for g in grids))
        with np.errstate(divide="ignore"):
            kernel = np.where(distance > 0, 1.0 / np.where(distance > 0, distance, 1.0), 0.0)
        x = np.where(inside, image[box] - mean, 0.0)
        m = inside.astype(np.float64)
        near_mask = signal.fftconvolve(m, kernel, mode="same")
        weight_sum = float((m * near_mask).sum())
        moran = float((x * signal.fftconvolve(x, kernel, mode="same")).sum())
        # sum w (x_k - x_l)^2 = 2 sum_k x_k^2 (w * m)_k - 2 sum_k x_k (w * x)_k
        geary = 2 * float((x ** 2 * near_mask).sum()) - 2 * moran
    else:
        keep = np.linspace(0, n - 1, MAX_PAIRWISE_VOXELS).round().astype(int)
        positions, values = positions[keep], values[keep]
        n = len(values)
        deviation = values - values.mean()
        denominator = float((deviation ** 2).sum())
        weight_sum = moran = geary = 0.0
        for start in range(0, n, 512):  # rows of the pair matrix in blocks: memory O(512 n)
            rows = slice(start, start + 512)
            pair = spatial.distance.cdist(positions[rows], positions)
            w = np.where(pair > 0, 1.0 / np.where(pair > 0, pair, 1.0), 0.0)
            weight_sum += float(w.sum())
            moran += float((w * np.outer(deviation[rows], deviation)).sum())
            geary += float((w * (values[rows, None] - values[None, :]) ** 2).sum())
    return {"morph_moran_i": n / weight_sum * moran / denominator,
            "morph_geary_c": (n - 1) / (2 * weight_sum) * geary / denominator}


# --- local intensity ----------------------------------------------------------------------------

def _local_peaks(image: np.ndarray, mask: np.ndarray, spacing: np.ndarray) -> dict[str, float]:
    """Mean intensity of the image voxels whose centres lie within 1 cm3 of a ROI voxel's centre
    (IBSI 3.2): at the ROI's brightest voxel (local peak) and the highest anywhere in the ROI
    (global peak)."""
    reach = np.floor(PEAK_RADIUS_MM / spacing).astype(int)
    grids = np.meshgrid(*(np.arange(-r, r + 1) * s for r, s in zip(reach, spacing, strict=True)),
                        indexing="ij")
    kernel = (sum(g ** 2 for g in grids) <= PEAK_RADIUS_MM ** 2).astype(np.float64)
    where = np.argwhere(mask)
    low = np.maximum(where.min(axis=0) - reach, 0)
    high = np.minimum(where.max(axis=0) + reach + 1, mask.shape)
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))
    crop = image[box].astype(np.float64)
    sums = signal.fftconvolve(crop, kernel, mode="same")
    counts = signal.fftconvolve(np.ones_like(crop), kernel, mode="same")
    means = (sums / np.maximum(counts.round(), 1))[mask[box]]
    intensities = crop[mask[box]]
    brightest = intensities >= intensities.max()
    return {"loc_peak_loc": float(means[brightest].max()), "loc_peak_glob": float(means.max())}


# --- statistics and the intensity histogram -----------------------------------------------------

def _dispersion(values: np.ndarray, prefix: str) -> dict[str, float]:
    p25, p75 = np.percentile(values, [25, 75])
    mean = float(values.mean())
    return {
        f"{prefix}medad": float(np.abs(values - np.median(values)).mean()),
        f"{prefix}cov": float(values.std()) / mean if mean else math.nan,
        f"{prefix}qcod": float((p75 - p25) / (p75 + p25)) if p75 + p25 else math.nan,
    }


def _histogram(levels: np.ndarray) -> dict[str, float]:
    """IBSI 3.4: statistics of the discretised grey levels and of their histogram."""
    x = levels.astype(np.float64)
    mean, var = float(x.mean()), float(x.var())
    centred = x - mean
    p10, p25, p50, p75, p90 = np.percentile(x, [10, 25, 50, 75, 90])
    counts = np.bincount(levels, minlength=int(levels.max()) + 1)[1:].astype(np.float64)
    probability = counts / counts.sum()
    present = probability[probability > 0]
    tallest = np.flatnonzero(counts == counts.max()) + 1
    robust = x[(x >= p10) & (x <= p90)]
    gradient = np.gradient(counts) if len(counts) > 1 else np.zeros(1)
    out = {
        "ih_mean": mean, "ih_var": var,
        "ih_skew": float((centred ** 3).mean() / var ** 1.5) if var else 0.0,
        "ih_kurt": float((centred ** 4).mean() / var ** 2 - 3) if var else 0.0,
        "ih_median": float(p50), "ih_min": float(x.min()), "ih_p10": float(p10),
        "ih_p90": float(p90), "ih_max": float(x.max()),
        "ih_mode": float(tallest[np.argmin(np.abs(tallest - mean))]),
        "ih_iqr": float(p75 - p25), "ih_range": float(x.max() - x.min()),
        "ih_mad": float(np.abs(centred).mean()),
        "ih_rmad": float(np.abs(robust - robust.mean()).mean()) if len(robust) else math.nan,
        "ih_entropy": float(-(present * np.log2(present)).sum()),
        "ih_uniformity": float((present ** 2).sum()),
        "ih_max_grad": float(gradient.max()), "ih_max_grad_g": float(np.argmax(gradient) + 1),
        "ih_min_grad": float(gradient.min()), "ih_min_grad_g": float(np.argmin(gradient) + 1),
    }
    out.update(_dispersion(x, "ih_"))
    return out


def _intensity_volume(values: np.ndarray, low: float, high: float) -> dict[str, float]:
    """IBSI 3.5: V_x is the fraction of the volume at or above the intensity fraction x of
    [low, high]; I_x the lowest intensity of the grid that at most a fraction x of the volume
    reaches. The grid steps through every discretised level between the ROI's lowest and one
    past its highest (levels absent from the ROI included) when the intensities are on a
    regular grid (bin numbers, bin centres, integer intensities), else through the intensities
    present."""
    present = np.unique(values)
    steps = np.diff(present)
    step = float(steps.min()) if len(steps) else 1.0
    regular = bool(np.allclose(steps / step, np.rint(steps / step))) if len(steps) else True
    count = int(round((present[-1] - present[0]) / step)) + 2
    grid = present[0] + step * np.arange(count) if regular and count <= 1_000_000 else present
    ordered = np.sort(values)
    at_or_above = 1.0 - np.searchsorted(ordered, grid - 1e-9 * step, side="left") / len(values)
    span = high - low

    def volume_at(x: float) -> float:
        return float((values >= low + x * span - 1e-9 * max(abs(span), 1.0)).mean())

    def intensity_at(x: float) -> float:
        reached = np.flatnonzero(at_or_above <= x + 1e-12)
        return float(grid[reached[0]]) if len(reached) else float(present[-1] + step)

    out = {"ivh_v10": volume_at(0.1), "ivh_v90": volume_at(0.9),
           "ivh_i10": intensity_at(0.1), "ivh_i90": intensity_at(0.9)}
    out["ivh_diff_v10_v90"] = out["ivh_v10"] - out["ivh_v90"]
    out["ivh_diff_i10_i90"] = out["ivh_i10"] - out["ivh_i90"]
    return out


# --- texture matrices: distance zones and NGLDM -------------------------------------------------

_Slice = tuple[np.ndarray, np.ndarray, np.ndarray, bool]


def _slices(dimension: Dimension, morph: np.ndarray, intensity: np.ndarray,
            levels: np.ndarray) -> Iterator[list[_Slice]]:
    """Groups of (morph, intensity, levels, in_plane) whose matrices are merged: the volume
    (3D), all slices together (2.5D) or each slice alone (2D)."""
    if dimension == "3D":
        yield [(morph, intensity, levels, False)]
    elif dimension == "2.5D":
        yield [(morph[z:z + 1], intensity[z:z + 1], levels[z:z + 1], True)
               for z in range(morph.shape[0]) if intensity[z].any()]
    else:
        for z in range(morph.shape[0]):
            if intensity[z].any():
                yield [(morph[z:z + 1], intensity[z:z + 1], levels[z:z + 1], True)]


_Matrix = tuple[np.ndarray, int]  # a texture matrix and the voxels it counts


def _mean_over(groups: Iterator[list[_Slice]],
               matrix_of: Callable[[np.ndarray, np.ndarray, np.ndarray, bool], _Matrix],
               features_of: Callable[[np.ndarray, int], dict[str, float]]) -> dict[str, float]:
    """The features of every group's merged matrix, averaged over groups."""
    results: list[dict[str, float]] = []
    for group in groups:
        merged: _Matrix | None = None
        for member in group:
            part = matrix_of(*member)
            merged = part if merged is None else _add(merged, part)
        if merged is not None:
            results.append(features_of(*merged))
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]} if results else {}


def _add(a: _Matrix, b: _Matrix) -> _Matrix:
    """Sum of two (matrix, voxel count) pairs whose matrices may differ in shape."""
    shape = tuple(max(x, y) for x, y in zip(a[0].shape, b[0].shape, strict=True))
    total = np.zeros(shape)
    total[tuple(slice(0, s) for s in a[0].shape)] += a[0]
    total[tuple(slice(0, s) for s in b[0].shape)] += b[0]
    return total, a[1] + b[1]


def _connectivity(in_plane: bool, full: bool) -> np.ndarray:
    """Neighbourhood structure: 26 (full) or 6 neighbours in 3D; 8 or 4 within the slice."""
    structure = ndimage.generate_binary_structure(3, 3 if full else 1)
    if in_plane:
        structure[0] = structure[2] = False
    return structure


def _distance_zone_matrix(morph: np.ndarray, intensity: np.ndarray, levels: np.ndarray,
                          in_plane: bool) -> _Matrix:
    """The grey level distance zone matrix (IBSI 3.10) of one group member.
    Zones: connected voxels (26 / 8 neighbours) of one grey level in the intensity mask; a
    zone's distance: the fewest 6- (4-) connected steps from any of its voxels to the outside of
    the morphological mask, a border voxel counting 1."""
    distance = ndimage.distance_transform_cdt(np.pad(morph, 1),
                                              metric=_connectivity(in_plane, False))
    distance = distance[1:-1, 1:-1, 1:-1]
    ng = int(levels[intensity].max())
    nd = int(distance[intensity].max())
    matrix = np.zeros((ng, max(nd, 1)))
    structure = _connectivity(in_plane, True)
    for g in np.unique(levels[intensity]):
        zones, count = ndimage.label(intensity & (levels == g), structure=structure)
        if count:
            nearest = ndimage.minimum(distance, zones, np.arange(1, count + 1)).astype(int)
            np.add.at(matrix, (int(g) - 1, nearest - 1), 1)
    return matrix, int(intensity.sum())


def _zone_features(matrix: np.ndarray, voxels: int) -> dict[str, float]:
    ns = matrix.sum()
    p = matrix / ns
    i = np.arange(1, matrix.shape[0] + 1, dtype=float)[:, None]
    j = np.arange(1, matrix.shape[1] + 1, dtype=float)[None, :]
    by_level, by_distance = matrix.sum(axis=1), matrix.sum(axis=0)
    mu_i, mu_j = float((i * p).sum()), float((j * p).sum())
    present = p[p > 0]

    def emphasis(weight: np.ndarray) -> float:
        return float((p * weight).sum())

    return {
        "dzm_sde": emphasis(1 / j ** 2), "dzm_lde": emphasis(j ** 2),
        "dzm_lgze": emphasis(1 / i ** 2), "dzm_hgze": emphasis(i ** 2),
        "dzm_sdlge": emphasis(1 / (i ** 2 * j ** 2)), "dzm_sdhge": emphasis(i ** 2 / j ** 2),
        "dzm_ldlge": emphasis(j ** 2 / i ** 2), "dzm_ldhge": emphasis(i ** 2 * j ** 2),
        "dzm_glnu": float((by_level ** 2).sum() / ns),
        "dzm_glnu_norm": float((by_level ** 2).sum() / ns ** 2),
        "dzm_zdnu": float((by_distance ** 2).sum() / ns),
        "dzm_zdnu_norm": float((by_distance ** 2).sum() / ns ** 2),
        "dzm_z_perc": float(ns / voxels),
        "dzm_gl_var": float(((i - mu_i) ** 2 * p).sum()),
        "dzm_zd_var": float(((j - mu_j) ** 2 * p).sum()),
        "dzm_zd_entr": float(-(present * np.log2(present)).sum()),
    }


def _ngldm(intensity: np.ndarray, levels: np.ndarray, in_plane: bool, alpha: int) -> _Matrix:
    """The neighbouring grey level dependence matrix (IBSI 3.11; Chebyshev distance 1, coarseness
    ``alpha``) of one group member."""
    structure = _connectivity(in_plane, True)
    structure[1, 1, 1] = False
    padded_mask = np.pad(intensity, 1)
    padded_levels = np.pad(np.where(intensity, levels, 0), 1)
    dependence = np.ones(intensity.shape, dtype=np.int64)
    core = tuple(slice(1, -1) for _ in range(3))
    for offset in np.argwhere(structure) - 1:
        shifted = tuple(slice(1 + o, s - 1 + o) for o, s in zip(offset, padded_mask.shape,
                                                                  strict=True))
        agree = padded_mask[shifted] & (np.abs(padded_levels[shifted] - padded_levels[core])
                                        <= alpha)
        dependence += agree & intensity
    ng = int(levels[intensity].max())
    matrix = np.zeros((ng, int(dependence[intensity].max())))
    np.add.at(matrix, (levels[intensity].astype(int) - 1, dependence[intensity] - 1), 1)
    return matrix, int(intensity.sum())


def _dependence_features(matrix: np.ndarray, voxels: int) -> dict[str, float]:
    """The NGLDM features pyradiomics' GLDM lacks."""
    ns = matrix.sum()
    p = matrix / ns
    return {"ngl_glnu_norm": float((matrix.sum(axis=1) ** 2).sum() / ns ** 2),
            "ngl_dc_perc": float(ns / voxels), "ngl_dc_energy": float((p ** 2).sum())}
