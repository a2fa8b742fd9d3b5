"""How much of the scanners' leave-one-site-out (LOSO) drop harmonization can recover, and
whether federation beats local-only training, averaged over many train/test splits.

One study split gives 12 to 33 test patients a site, too few for a stable AUC (``bench/study.py``
prints one table per seed). This benchmark takes the default cohort with and without scanner
effects, extracts it once (the study's own preparation), then for ``--splits`` stratified
random splits runs the study's recipe in-process (the pooled fit equals the federated one to
1e-6: ``tests/common/test_selection.py``) and prints, mean over splits:

* LOSO AUC per site without scanner effects, with them on raw features, after plain ComBat,
  after ComBat with the outcome protected (the study's default), and after an *oracle*:
  per-scanner location and scale fitted on every row, training and test, with the label
  protected and no shrinkage (the most any location-scale harmonization could do here); the
  share of the drop each recovers (the issue's goal: 80%);
* per site, the local-only model's and the federated model's test AUC, and how often federated
  wins.

    python bench/loso_harmonization.py [--splits 8] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.study import default_cohorts  # noqa: E402
from cli.simulation import run_in_simulation  # noqa: E402
from client.workspace import PREPARED_FILE, feature_columns  # noqa: E402
from common.protocol import load_protocol  # noqa: E402
from common.selection.pooled import fit_pooled  # noqa: E402
from common.selection.terms import assign_folds  # noqa: E402
from harmonization.combat.design import CombatOptions, Design  # noqa: E402
from harmonization.combat.model import SiteTable, fit_combat  # noqa: E402
from server.study import StudySettings  # noqa: E402

VARIANTS = ("raw", "ComBat", "ComBat, outcome protected", "oracle location-scale")


def prepared(cohort: Path) -> dict[str, pd.DataFrame]:
    """Each site's prepared table (features, label, batch), extracting it when needed."""
    protocol = load_protocol(cohort / "study.yaml")
    out = cohort.parent / f"{cohort.name}-prepare"
    run_in_simulation(cohort, StudySettings(protocol, out, until="prepare"), lambda _: None)
    return {p.name: pd.read_parquet(p / "study" / protocol.short_hash / PREPARED_FILE)
            for p in sorted((cohort / "work").iterdir())}


def split(labels: np.ndarray, seed: int, fraction: float = 0.3) -> np.ndarray:
    """A stratified random test mask."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for value in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == value))
        test[rows[: int(round(fraction * len(rows)))]] = True
    return test


def harmonize(tables: dict[str, pd.DataFrame], tests: dict[str, np.ndarray], names: list[str],
              label: str, variant: str) -> dict[str, np.ndarray]:
    x = {s: t[names].to_numpy(float) for s, t in tables.items()}
    if variant == "raw":
        return x
    protect = variant != "ComBat"
    oracle = variant.startswith("oracle")
    batches = tuple(sorted({b for t in tables.values() for b in t.batch.astype(str)}))
    categorical = [("sex", ("F", "M"))] + ([(label, ("0", "1"))] if protect else [])
    design = Design(batches, tuple(categorical), ("age",),
                    fit_only=(label,) if protect else ())
    options = CombatOptions(min_batch_size=5, min_cell=1, eb=not oracle)
    sites = []
    for s, t in tables.items():
        rows = np.ones(len(t), bool) if oracle else ~tests[s]
        fit = t[rows]
        sites.append(SiteTable(s, x[s][rows], fit.batch.astype(str).tolist(),
                               {"sex": fit.sex.tolist(), "age": fit.age.tolist(),
                                label: fit[label].astype(int).tolist()}))
    model = fit_combat(sites, design, options)
    return {s: model.transform(x[s], t.batch.astype(str).tolist(),
                               {"sex": t.sex.tolist(), "age": t.age.tolist()})
            for s, t in tables.items()}


def fit(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], spec):  # noqa: ANN001, ANN201
    model, _ = fit_pooled(rows, "logistic", spec.penalty, spec.screening_top_k, spec.n_lambdas,
                          spec.cv_folds, spec.lambda_rule)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=8)
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the cohorts here (reused when present)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="myelofed-bench-loso-"))
    start = time.perf_counter()
    tables = {effects: prepared(cohort) for effects, cohort in default_cohorts(work).items()}
    protocol = load_protocol(work / "scanners" / "study.yaml")
    label, spec = protocol.task.label_column, protocol.model
    names = feature_columns(next(iter(tables[True].values())), protocol)
    loso: list[dict[str, object]] = []
    versus: list[dict[str, object]] = []
    for r in range(args.splits):
        for effects, variants in ((False, ("raw",)), (True, VARIANTS)):
            sites = tables[effects]
            tests = {s: split(t[label].to_numpy(), 1000 * r + i)
                     for i, (s, t) in enumerate(sites.items())}
            for variant in variants:
                x = harmonize(sites, tests, names, label, variant)
                rows = {s: (x[s][~tests[s]], t[label].to_numpy(float)[~tests[s]],
                            assign_folds(t[label].to_numpy(float)[~tests[s]], spec.cv_folds, r,
                                         True)) for s, t in sites.items()}
                name = variant if effects else "no scanner effects"
                for k, t in sites.items():
                    y = t[label].to_numpy(float)[tests[k]]
                    model = fit([rows[s] for s in sites if s != k], spec)
                    loso.append({"split": r, "variant": name, "site": k,
                                 "auc": roc_auc_score(y, model.score(x[k][tests[k]]))})
                if effects and variant in ("raw", "ComBat, outcome protected"):
                    federated = fit(list(rows.values()), spec)
                    for k, t in sites.items():
                        y = t[label].to_numpy(float)[tests[k]]
                        versus.append({
                            "split": r, "features": variant, "site": k,
                            "local": roc_auc_score(y, fit([rows[k]], spec).score(x[k][tests[k]])),
                            "federated": roc_auc_score(y, federated.score(x[k][tests[k]]))})
    table = pd.DataFrame(loso).pivot_table(index="variant", columns="site", values="auc")
    table["mean"] = table.mean(axis=1)
    order = ["no scanner effects", *VARIANTS]
    table = table.loc[order]
    none, raw = table.loc["no scanner effects", "mean"], table.loc["raw", "mean"]
    table["recovered"] = [float("nan") if v in ("no scanner effects", "raw") else
                          (table.loc[v, "mean"] - raw) / (none - raw) for v in order]
    print(f"\nLOSO test AUC, mean over {args.splits} splits (drop {none - raw:.3f}; goal: "
          "harmonization recovers >= 80% of it)")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    duel = pd.DataFrame(versus)
    duel["federated wins"] = duel.federated > duel.local
    print(f"\nlocal-only vs federated test AUC per site, mean over {args.splits} splits "
          "(goal: federated higher at every site)")
    print(duel.groupby(["features", "site"])[["local", "federated", "federated wins"]].mean()
          .to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"\n{time.perf_counter() - start:.0f} s; cohorts under {work}")


if __name__ == "__main__":
    main()
