"""What updating the federated model at each site adds (issue 16): local-only, federated and
site-updated radiomics models, mean test AUC per site over many train/test splits, on the
default cohort and on cohorts drawn with other seeds and site sizes.

Each cohort (``--cohorts SEED:SIZES``) is written with scanner effects and extracted under the
study protocol through the study's own phases (``bench/loso_harmonization.py``'s ``prepared``,
so the histogram standard is the federated one); then for ``--splits`` stratified random splits
the study's recipe runs in-process on the training rows (the pooled fit equals the federated
one: ``tests/common/test_selection.py``), on raw features and after ComBat + CovBat (the spine
MRI presets' harmonization), and every site scores on its test rows:

* ``local``: its local-only model (screening + penalized fit on its own rows);
* ``federated``: the model of every site's training rows;
* ``site-updated``: the federated model updated on the site's own training rows, the candidate
  its cross-validation prefers (:func:`common.selection.updating.update_at_site`, as
  ``client/phases/validation.py`` runs it);
* ``average``: the mean of the local-only and the federated model's scores (an equal-weight
  blend: a trial measured whether averaging the two would be at least both);
* ``updated by AUC``: the same candidates chosen by their mean held-out AUC instead of their
  deviance (not the study's choice: the benchmark measures whether ranking would choose better).

It prints, per cohort, features and site, the mean AUC of each, how often the site-updated model
is at least the local one, which candidates the sites chose, and whether the issue's goal holds:
the site-updated model at least the local-only and at least the federated one at every site.

    python bench/site_updating.py [--splits 8] [--cohorts 0:40,70,110 ...] [--work DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loso_harmonization import (  # noqa: E402
    Cohort,
    cohort_arguments,
    cohort_dirs,
    fit,
    harmonize,
    prepared,
    split,
)
from client.workspace import feature_columns  # noqa: E402
from common.protocol import load_protocol  # noqa: E402
from common.selection.terms import assign_folds  # noqa: E402
from common.selection.updating import (  # noqa: E402
    _comparable,
    _fit,
    candidates,
    update_at_site,
)

STEPS = ("raw", "ComBat + CovBat")


def choose_by_auc(x: np.ndarray, y: np.ndarray, folds: np.ndarray, federated, local):  # noqa: ANN001, ANN201
    """The site update chosen by the candidates' mean held-out AUC over the site's folds
    instead of their deviance (a ranking criterion, as the test AUC is), refitted on every
    row: what the benchmark compares with the study's choice."""
    auc = dict.fromkeys(candidates(), 0.0)
    for fold in np.unique(folds):
        train, held = folds != fold, folds == fold
        if not _comparable(y[train], "logistic") or len(np.unique(y[held])) < 2:
            continue
        for name in auc:
            try:
                auc[name] += roc_auc_score(y[held], _fit(name, x[train], y[train], federated,
                                                         "logistic", local).score(x[held]))
            except Exception:  # noqa: BLE001 - a candidate that cannot be fitted loses
                auc[name] -= 1e9
    choice = max(auc, key=lambda n: auc[n])  # the first of equals: the simplest
    return _fit(choice, x, y, federated, "logistic", local), choice


def evaluate(tables: dict[str, pd.DataFrame], names: list[str], label: str, spec, r: int
             ) -> list[dict[str, object]]:  # noqa: ANN001
    """Every site's three models under each feature step, for split ``r``."""
    tests = {s: split(t[label].to_numpy(), 1000 * r + i) for i, (s, t) in enumerate(tables.items())}
    out = []
    for step in STEPS:
        x = harmonize(tables, tests, names, label, step)
        rows = {s: (x[s][~tests[s]], t[label].to_numpy(float)[~tests[s]],
                    assign_folds(t[label].to_numpy(float)[~tests[s]], spec.cv_folds, r, True))
                for s, t in tables.items()}
        federated = fit(list(rows.values()), spec)
        for s, t in tables.items():
            train_x, train_y, folds = rows[s]
            y = t[label].to_numpy(float)[tests[s]]

            def local(a: np.ndarray, b: np.ndarray):  # noqa: ANN202
                return fit([(a, b, assign_folds(b, spec.cv_folds, r, True))], spec)

            update = update_at_site(train_x, train_y, folds, federated, "logistic", local)
            by_auc, auc_choice = choose_by_auc(train_x, train_y, folds, federated, local)
            test_x = x[s][tests[s]]
            local_score = fit([rows[s]], spec).score(test_x)
            out.append({"split": r, "features": step, "site": s, "choice": update.choice,
                        "auc choice": auc_choice,
                        "local": roc_auc_score(y, local_score),
                        "federated": roc_auc_score(y, federated.score(test_x)),
                        "site-updated": roc_auc_score(y, update.model.score(test_x)),
                        "updated by AUC": roc_auc_score(y, by_auc.score(test_x)),
                        "average": roc_auc_score(y, (local_score
                                                     + federated.score(test_x)) / 2)})
    return out


def report(results: pd.DataFrame, splits: int) -> None:
    results["updated >= local"] = results["site-updated"] >= results["local"]
    print(f"\ntest AUC per site, mean over {splits} splits ('updated >= local': the share of "
          "splits where the site-updated model is at least the local one)")
    mean = results.groupby(["cohort", "features", "site"])[
        ["local", "federated", "site-updated", "updated >= local", "updated by AUC",
         "average"]].mean()
    print(mean.to_string(float_format=lambda v: f"{v:.3f}"))
    for column in ("choice", "auc choice"):
        print(f"\nthe candidates the sites' cross-validation chose by "
              f"{'deviance' if column == 'choice' else 'mean held-out AUC'} (count of splits)")
        print(results.groupby(["features", column]).size().unstack(0).fillna(0).astype(int)
              .to_string())
    for features, part in mean.groupby(level="features"):
        for model in ("site-updated", "updated by AUC", "average"):
            holds = ((part[model] >= part["local"]) & (part[model] >= part["federated"]))
            print(f"\n{features}: {model} >= local-only and >= federated at "
                  f"{int(holds.sum())} of {len(holds)} site-cohorts")


def main() -> None:
    args, work = cohort_arguments(__doc__, "updating")
    start = time.perf_counter()
    results = []
    for cohort in map(Cohort.parse, args.cohorts):
        cohort_dir = cohort_dirs(work, cohort)[True]
        protocol = load_protocol(cohort_dir / "study.yaml")
        tables = prepared(cohort_dir, "study protocol", lambda mapping: mapping)
        names = feature_columns(next(iter(tables.values())), protocol)
        for r in range(args.splits):
            results += [{**row, "cohort": cohort.name}
                        for row in evaluate(tables, names, protocol.task.label_column,
                                            protocol.model, r)]
        print(f"{cohort.name}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    report(pd.DataFrame(results), args.splits)
    print(f"\n{time.perf_counter() - start:.0f} s; cohorts under {work}")


if __name__ == "__main__":
    main()
