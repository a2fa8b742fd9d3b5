"""Federated Harmony (:mod:`harmonization.federated_harmony`) against harmonypy on the pooled
embeddings: how far apart the corrections are, how well each mixes the scanners (LISI), what the
sites send, and how long it takes.

Three families of synthetic embeddings, two groups (the biology) seen by three scanners that
shift two dimensions, each drawn with ``--seeds`` seeds:

* ``tight blobs``: six clear clusters, so k-means has one answer and the federated run starts
  where harmonypy does (6 clusters);
* ``uneven scanners``: two clear groups, one scanner crowding each, close enough for soft
  memberships, so the diversity penalty moves cells (2 clusters);
* ``overlapping``: groups and scanners overlap (harmonypy's default number of clusters); the
  optimum Harmony reaches depends on its start and its random blocks, so harmonypy is also
  compared with itself under another ``random_state``.

Each is run pooled (one site), on two sites and on three (one scanner each). ``difference`` is
||federated - harmonypy|| / ||harmonypy - input||, the median and the largest over the seeds.

With ``--study COHORT``, the CNN embeddings a study with ``harmonization.embeddings`` left at
its sites (``COHORT/work/<site>/study/<hash>/cnn/``; e.g. ``myelofed demo`` with the option in
the cohort's ``study.yaml``): the pooled LISI, which no participant of the study can compute,
of the scanners and of the label on the principal components before and after Harmony, and the
same for harmonypy run on the pooled components; and, for each site left out, a ridge logistic
model of the label on the other sites' components (all their cases) scored on the left-out
site's test cases, before and after (one study: 12 to 33 test cases a site, so a single
reading).

    python bench/harmony.py [--seeds 5] [--study COHORT]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harmonization.federated_harmony import FederatedHarmonyOptions  # noqa: E402
from harmonization.harmony import HarmonyOptions, harmony_embeddings, lisi  # noqa: E402
from harmonization.harmony_server import HarmonyResult, federated_harmony  # noqa: E402

SCANNER_SHIFT = {"s1": (0.0, 0.0), "s2": (4.0, -3.0), "s3": (-4.0, 3.0)}
SPLITS = {"pooled": [["s1", "s2", "s3"]], "2 sites": [["s1", "s2"], ["s3"]],
          "3 sites": [["s1"], ["s2"], ["s3"]]}
Data = tuple[np.ndarray, np.ndarray, np.ndarray]


def tight_blobs(seed: int) -> Data:
    rng = np.random.default_rng(seed)
    batch = np.repeat(list(SCANNER_SHIFT), 80)
    group = rng.integers(0, 2, batch.size)
    x = rng.normal(0, 0.3, (batch.size, 8)) + 1.0
    x[:, 0] += 6.0 * group
    x[:, 1:3] += np.array([SCANNER_SHIFT[b] for b in batch])
    return x, batch, group


def uneven_scanners(seed: int) -> Data:
    rng = np.random.default_rng(seed)
    counts = {("s1", 0): 60, ("s2", 0): 15, ("s3", 0): 15,
              ("s1", 1): 15, ("s2", 1): 45, ("s3", 1): 30}
    batch = np.concatenate([[s] * n for (s, _), n in counts.items()])
    group = np.concatenate([[g] * n for (_, g), n in counts.items()])
    x = rng.normal(0, 0.3, (batch.size, 6))
    x[:, 0] += 3.0
    x[:, 1] += 1.5 * group
    x[:, 2] += np.array([{"s1": 0.0, "s2": 0.5, "s3": -0.5}[b] for b in batch])
    return x, batch, group


def overlapping(seed: int) -> Data:
    rng = np.random.default_rng(seed)
    batch = np.repeat(list(SCANNER_SHIFT), 80)
    group = rng.integers(0, 2, batch.size)
    x = rng.normal(0, 1, (batch.size, 8))
    x[:, 0] += 6.0 * group
    x[:, 1:3] += np.array([SCANNER_SHIFT[b] for b in batch])
    return x, batch, group


FAMILIES: dict[str, tuple[Callable[[int], Data], int | None]] = {
    "tight blobs": (tight_blobs, 6), "uneven scanners": (uneven_scanners, 2),
    "overlapping": (overlapping, None)}


def federated_run(x: np.ndarray, batch: np.ndarray, groups: list[list[str]],
                  options: FederatedHarmonyOptions) -> tuple[np.ndarray, HarmonyResult]:
    masks = [np.isin(batch, g) for g in groups]
    result = federated_harmony([x[m] for m in masks], [batch[m] for m in masks], options)
    out = np.empty_like(x)
    for mask, corrected in zip(masks, result.corrected, strict=True):
        out[mask] = corrected
    return out, result


def study_embeddings(cohort: Path) -> None:
    """The pooled LISI of a study's CNN embeddings before and after its federated Harmony."""
    from client.workspace import EMBEDDINGS_FILE, HARMONIZED_EMBEDDINGS_FILE, PREPARED_FILE
    from common.protocol import load_protocol
    from harmonization.covbat import principal_axes, site_residual_products

    protocol = load_protocol(cohort / "study.yaml")
    spec = protocol.harmonization.embeddings
    if spec is None:
        raise SystemExit(f"{cohort / 'study.yaml'} has no harmonization.embeddings")
    raw, after, scanners, labels, sites, tests = [], [], [], [], [], []
    for site in sorted((cohort / "work").iterdir()):
        folder = site / "study" / protocol.short_hash
        with np.load(folder / "cnn" / EMBEDDINGS_FILE) as e, \
                np.load(folder / "cnn" / HARMONIZED_EMBEDDINGS_FILE) as h:
            label = pd.read_parquet(folder / PREPARED_FILE).set_index("case_id")[
                protocol.task.label_column]
            raw.append(e["values"])
            after.append(h["values"])
            scanners += e["scanners"].tolist()
            labels += label.loc[e["case_ids"]].astype(str).tolist()
            sites += [site.name] * len(e["case_ids"])
            tests += [s == "test" for s in e["splits"].tolist()]
    axes = principal_axes([site_residual_products(x) for x in raw], n_pc=spec.n_components)
    before = np.vstack([(x - axes.mean) @ axes.components for x in raw])
    pooled = harmony_embeddings(before, scanners, HarmonyOptions(n_clusters=spec.n_clusters))
    print(f"\n{cohort}: {len(scanners)} cases, {len(set(scanners))} scanners, "
          f"{axes.components.shape[1]} components ({axes.explained:.0%} of the variance)")
    for name, x in (("before", before), ("federated Harmony", np.vstack(after)),
                    ("harmonypy, pooled", pooled)):
        print(f"  {name:18s} LISI scanner {lisi(x, scanners).mean():.3f}, "
              f"label {lisi(x, labels).mean():.3f}; left-out AUC "
              + ", ".join(f"{k} {v:.3f}" for k, v in
                          _left_out(x, np.asarray(labels), np.asarray(sites),
                                    np.asarray(tests)).items()))


def _left_out(x: np.ndarray, labels: np.ndarray, sites: np.ndarray, tests: np.ndarray
              ) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    y = (labels == np.unique(labels)[-1]).astype(int)
    out = {}
    for site in np.unique(sites):
        train, test = sites != site, (sites == site) & tests
        model = LogisticRegression(C=1.0, max_iter=1000).fit(x[train], y[train])
        out[site] = float(roc_auc_score(y[test], model.decision_function(x[test])))
    out["mean"] = float(np.mean(list(out.values())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--study", type=Path, default=None,
                        help="a cohort whose study harmonized its CNN embeddings")
    args = parser.parse_args()
    if args.study is not None:
        study_embeddings(args.study)
        return
    rows = []
    for family, (make, clusters) in FAMILIES.items():
        for seed in range(args.seeds):
            x, batch, group = make(seed)
            start = time.perf_counter()
            reference = harmony_embeddings(x, batch, HarmonyOptions(n_clusters=clusters, seed=seed))
            seconds = time.perf_counter() - start
            size = np.linalg.norm(reference - x)
            other = harmony_embeddings(x, batch,
                                       HarmonyOptions(n_clusters=clusters, seed=seed + 100))
            rows.append({"family": family, "run": "harmonypy, other seed", "seed": seed,
                         "difference": np.linalg.norm(other - reference) / size,
                         "LISI scanner": lisi(other, batch).mean(),
                         "LISI group": lisi(other, group).mean()})
            rows.append({"family": family, "run": "harmonypy", "seed": seed, "difference": 0.0,
                         "LISI scanner": lisi(reference, batch).mean(),
                         "LISI group": lisi(reference, group).mean(), "seconds": seconds,
                         "before": lisi(x, batch).mean()})
            for name, groups in SPLITS.items():
                start = time.perf_counter()
                ours, result = federated_run(x, batch, groups, FederatedHarmonyOptions(
                    n_clusters=clusters, seed=seed))
                rows.append({"family": family, "run": name, "seed": seed,
                             "difference": np.linalg.norm(ours - reference) / size,
                             "LISI scanner": lisi(ours, batch).mean(),
                             "LISI group": lisi(ours, group).mean(),
                             "seconds": time.perf_counter() - start,
                             "rounds": result.trace.rounds,
                             "kB per site": np.mean(result.trace.sent_bytes) / 1e3,
                             "cluster mixing before": result.trace.diversity_before,
                             "cluster mixing after": result.trace.diversity_after})
    table = pd.DataFrame(rows)
    before = table.groupby("family").before.mean()
    print(f"federated Harmony against harmonypy {_version()}, {args.seeds} seeds per family; "
          "LISI before: " + ", ".join(f"{f} {v:.2f}" for f, v in before.items()))
    summary = table.groupby(["family", "run"], sort=False).agg(
        difference_median=("difference", "median"), difference_max=("difference", "max"),
        lisi_scanner=("LISI scanner", "mean"), lisi_group=("LISI group", "mean"),
        seconds=("seconds", "mean"), rounds=("rounds", "mean"),
        kb_per_site=("kB per site", "mean"),
        mixing_before=("cluster mixing before", "mean"),
        mixing_after=("cluster mixing after", "mean"))
    print(summary.to_string(float_format=lambda v: f"{v:.3g}"))


def _version() -> str:
    import harmonypy

    return str(getattr(harmonypy, "__version__", "?"))


if __name__ == "__main__":
    main()
