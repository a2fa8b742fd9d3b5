"""The federated study's acceptance table on the default synthetic cohort.

Runs the whole study (``myelofed demo``'s path: Flower's simulation engine, one virtual
SuperNode per site) on the default cohort with scanner effects and on the same cohort without
them, then prints, per study seed:

* the federated model's AUC on the pooled test rows against the *centralized* model (the same
  recipe run by one party holding every site's training rows; goal: ratio >= 0.98);
* per site, the federated model's test AUC against the site's local-only model (goal: higher
  at every site);
* leave-one-site-out (LOSO) AUC, mean over sites: without scanner effects, with them on raw
  features, and with them after federated ComBat; the share of the scanner-effect drop that
  ComBat recovers (goal >= 80%).

The benchmark reads the sites' tables only to compute the centralized baseline: the study
itself sends nothing patient-level.

    python bench/study.py [--seeds 0 1 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.simulation import run_in_simulation  # noqa: E402
from client.ledger import LEDGER_FILE  # noqa: E402
from client.workspace import HARMONIZED_FILE, PREPARED_FILE, feature_columns  # noqa: E402
from common.protocol import load_protocol  # noqa: E402
from common.selection.model import LinearModel  # noqa: E402
from common.selection.pooled import fit_pooled  # noqa: E402
from common.synthetic import CohortSpec, make_sites, read_cohort_spec, write_cohort  # noqa: E402
from server.study import StudySettings  # noqa: E402

SIZES = (40, 70, 110)


def run(cohort: Path, out: Path, seed: int) -> tuple[dict, float]:
    protocol = load_protocol(cohort / "study.yaml")
    start = time.perf_counter()
    run_in_simulation(cohort, StudySettings(protocol, out, seed=seed, until="model"),
                      lambda _: None)
    return json.loads((out / "model.json").read_text()), time.perf_counter() - start


def site_tables(cohort: Path, harmonized: bool) -> dict[str, pd.DataFrame]:
    protocol = load_protocol(cohort / "study.yaml")
    name = HARMONIZED_FILE if harmonized else PREPARED_FILE
    return {p.name: pd.read_parquet(p / "study" / protocol.short_hash / name)
            for p in sorted((cohort / "work").iterdir())}


def model_of(report: dict, names: list[str]) -> LinearModel:
    index = [names.index(f) for f in report["features"]]
    return LinearModel(np.array(index), np.array(report["mean"]), np.array(report["sd"]),
                       np.array([report["intercept"], *report["coefficients"]]))


def centralized_vs_federated(cohort: Path, model_json: dict, harmonized: bool) -> tuple[float,
                                                                                         float]:
    """AUC on the pooled test rows of the centralized fit and of the federated model."""
    protocol = load_protocol(cohort / "study.yaml")
    tables = site_tables(cohort, harmonized)
    names = feature_columns(next(iter(tables.values())), protocol)
    label = protocol.task.label_column
    spec = protocol.model
    train = pd.concat([t[t.split == "train"] for t in tables.values()])
    test = pd.concat([t[t.split == "test"] for t in tables.values()])
    central, _ = fit_pooled([(train[names].to_numpy(float), train[label].to_numpy(float),
                              train.fold.to_numpy())], "logistic", spec.penalty,
                            spec.screening_top_k, spec.n_lambdas, spec.cv_folds,
                            spec.lambda_rule)
    federated = model_of(model_json["training_sets"]["federated"]["model"], names)
    x, y = test[names].to_numpy(float), test[label].to_numpy(float)
    return roc_auc_score(y, central.score(x)), roc_auc_score(y, federated.score(x))


def default_cohorts(work: Path) -> dict[bool, Path]:
    """The default cohort with scanner effects (True) and without (False) under ``work``, made
    when absent (the same patients' sites, sizes and case mix)."""
    cohorts = {}
    for effects in (True, False):
        cohort = work / ("scanners" if effects else "no-scanners")
        if read_cohort_spec(cohort) is None:
            write_cohort(cohort, CohortSpec(make_sites(SIZES, effects, 0),
                                            scanner_effects=effects))
        cohorts[effects] = cohort
    return cohorts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="study seeds")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the cohorts here (reused when present)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="myelofed-bench-study-"))
    cohorts = default_cohorts(work)

    summary = []
    for seed in args.seeds:
        results, seconds = {}, {}
        for effects, cohort in cohorts.items():
            # each seed stands for a study at fresh sites: their release ledgers are cleared
            # (a real site keeps its ledger, and refuses another split of the same patients)
            for ledger in (cohort / "work").glob(f"*/study/*/{LEDGER_FILE}"):
                ledger.unlink()
            results[effects], seconds[effects] = run(cohort, work / f"out-{effects}-{seed}", seed)
        raw, harmonized = (next(m for m in results[True]["models"] if m["harmonized"] is h)
                           for h in (False, True))
        clean = next(m for m in results[False]["models"] if not m["harmonized"])
        central, federated = centralized_vs_federated(cohorts[True], raw, harmonized=False)
        print(f"\nseed {seed}: study {seconds[True]:.0f} s (scanner effects), "
              f"{seconds[False]:.0f} s (none)")
        print(f"  pooled test AUC: centralized {central:.3f}, federated {federated:.3f}, "
              f"ratio {federated / central:.3f} (goal >= 0.98)")
        print(f"  {'site':8} {'local':>7} {'federated':>10} {'fed+ComBat':>11} "
              f"{'LOSO none':>10} {'LOSO raw':>9} {'LOSO ComBat':>12}")
        wins = []
        loso = {"none": [], "raw": [], "combat": []}
        for site in sorted(raw["sites"]):
            m = raw["sites"][site]["metrics"]
            local, fed = m[f"local {site}"]["auc"], m["federated"]["auc"]
            wins.append(fed is not None and local is not None and fed > local)
            values = {"none": clean["sites"][site]["metrics"]["leave-site-out"]["auc"],
                      "raw": m["leave-site-out"]["auc"],
                      "combat": harmonized["sites"][site]["metrics"]["leave-site-out"]["auc"]}
            for k, v in values.items():
                loso[k].append(v)
            print(f"  {site:8} {local:7.3f} {fed:10.3f} "
                  f"{harmonized['sites'][site]['metrics']['federated']['auc']:11.3f} "
                  f"{values['none']:10.3f} {values['raw']:9.3f} {values['combat']:12.3f}")
        means = {k: float(np.mean(v)) for k, v in loso.items()}
        drop = means["none"] - means["raw"]
        recovered = (means["combat"] - means["raw"]) / drop if drop > 0 else float("nan")
        print(f"  federated > local-only at {sum(wins)}/{len(wins)} sites (goal: all)")
        print(f"  LOSO mean AUC: none {means['none']:.3f}, raw {means['raw']:.3f}, "
              f"ComBat {means['combat']:.3f}; drop {drop:.3f}, ComBat recovers "
              f"{recovered:.0%} of it (goal >= 80%)")
        summary.append((federated / central, sum(wins) == len(wins), drop, recovered))
    if len(summary) > 1:
        ratio, all_win, drop, rec = (np.array([s[i] for s in summary], float) for i in range(4))
        print(f"\nover {len(summary)} seeds: ratio {ratio.mean():.3f} (min {ratio.min():.3f}); "
              f"federated > local at every site in {int(all_win.sum())}/{len(summary)}; "
              f"LOSO drop {drop.mean():.3f}; recovered {np.nanmean(rec):.0%} "
              f"(SD {np.nanstd(rec):.0%})")
    print(f"\ncohorts and outputs: {work}")


if __name__ == "__main__":
    main()
