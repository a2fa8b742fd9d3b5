"""The PFS study's models over repeated splits (issue 18): Harrell's C per site of the local-only
and the federated LASSO Cox models, the survival nomogram (the federated score with ISS stage and
age) and the clinical factors alone, on the default cohort and on cohorts drawn with other seeds
and site sizes.

Each cohort (``--cohorts SEED:SIZES``, task ``pfs``, scanner effects on) is extracted under its
study protocol through the study's own phases (``bench/loso_harmonization.py``'s ``prepared``);
then for ``--splits`` random train/test splits stratified by event the study's recipe runs
in-process on the training rows, raw features (the pooled fit equals the federated one:
``tests/server/test_survival_simulation.py``), and every site scores each model on its test
rows:

* ``local``: its own LASSO Cox model (screening + penalty by its own cross-validation);
* ``federated``: the LASSO Cox model stratified by site, of every site's training rows;
* ``nomogram``: the stratified Cox model of the federated score, ISS stage and age (the study's
  ridge);
* ``clinical``: the stratified Cox model of ISS stage and age alone (what the images add is the
  nomogram's gain over it).

    python bench/survival_study.py [--splits 8] [--cohorts 0:40,70,110 ...] [--work DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loso_harmonization import Cohort, cohort_arguments, prepared, split  # noqa: E402
from client.workspace import feature_columns  # noqa: E402
from common.cox import fit_cox  # noqa: E402
from common.metrics.survival import survival_table  # noqa: E402
from common.payloads import NOMOGRAM_L2  # noqa: E402
from common.protocol import load_protocol  # noqa: E402
from common.selection.pooled import fit_pooled  # noqa: E402
from common.selection.terms import assign_folds  # noqa: E402
from common.synthetic import (  # noqa: E402
    CohortSpec,
    Task,
    make_sites,
    read_cohort_spec,
    write_cohort,
)

MODELS = ("local", "federated", "nomogram", "clinical")


def clinical(table: pd.DataFrame) -> np.ndarray:
    """ISS stage II and III indicators and age, the nomogram's clinical columns."""
    return np.column_stack([table.iss_stage == "II", table.iss_stage == "III",
                            table.age]).astype(float)


def evaluate(tables: dict[str, pd.DataFrame], names: list[str], spec, r: int  # noqa: ANN001
             ) -> list[dict[str, object]]:
    """Every site's four models for split ``r``: Harrell's C on its test rows."""
    def fit(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):  # noqa: ANN202
        model, _ = fit_pooled(rows, "cox", spec.penalty, spec.screening_top_k, spec.n_lambdas,
                              spec.cv_folds, spec.lambda_rule)
        return model

    parts = {}
    for i, (site, table) in enumerate(tables.items()):
        y = table[["pfs_months", "pfs_event"]].to_numpy(float)
        test = split(y[:, 1], 1000 * r + i)
        folds = assign_folds(y[~test, 1], spec.cv_folds, r, True)
        parts[site] = (table[names].to_numpy(float), y, test, folds)
    federated = fit([(x[~t], y[~t], f) for x, y, t, f in parts.values()])

    def strata(columns) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:  # noqa: ANN001
        return [(columns(site)[~t], y[~t, 0], y[~t, 1]) for site, (_, y, t, _) in parts.items()]

    def with_score(site: str) -> np.ndarray:
        return np.column_stack([federated.score(parts[site][0]), clinical(tables[site])])

    n = sum(int((~t).sum()) for _, _, t, _ in parts.values())
    nomogram = fit_cox(strata(with_score), l2=n * NOMOGRAM_L2)
    clinical_only = fit_cox(strata(lambda site: clinical(tables[site])), l2=n * NOMOGRAM_L2)
    out = []
    for site, (x, y, test, folds) in parts.items():
        scores = {"local": fit([(x[~test], y[~test], folds)]).score(x),
                  "federated": federated.score(x), "nomogram": with_score(site) @ nomogram,
                  "clinical": clinical(tables[site]) @ clinical_only}
        train = (y[~test, 0], y[~test, 1])
        row: dict[str, object] = {"split": r, "site": site, "events": int(y[test, 1].sum())}
        for name, score in scores.items():
            row[name] = survival_table(y[test, 0], y[test, 1], score[test],
                                       (*train, score[~test]), bootstrap=0)["c_harrell"]
        out.append(row)
    return out


def main() -> None:
    args, work = cohort_arguments(__doc__, "survival")
    start = time.perf_counter()
    results = []
    for cohort in map(Cohort.parse, args.cohorts):
        path = work / f"pfs-seed{cohort.seed}-{'-'.join(map(str, cohort.sizes))}"
        if read_cohort_spec(path) is None:
            write_cohort(path, CohortSpec(make_sites(cohort.sizes, True, cohort.seed), Task.PFS,
                                          seed=cohort.seed))
        protocol = load_protocol(path / "study.yaml")
        tables = prepared(path, "study protocol", lambda mapping: mapping)
        names = feature_columns(next(iter(tables.values())), protocol)
        for r in range(args.splits):
            results += [{**row, "cohort": cohort.name}
                        for row in evaluate(tables, names, protocol.model, r)]
        print(f"{cohort.name}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    frame = pd.DataFrame(results)
    print(f"\nHarrell's C per site, mean over {args.splits} splits (SD across splits in the "
          "last columns); test events per split in 'events'")
    grouped = frame.groupby(["cohort", "site"])
    table = grouped[["events", *MODELS]].mean().join(
        grouped[list(MODELS)].std().add_suffix(" SD"))
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    print("\nmean over every site and split: " + ", ".join(
        f"{name} {frame[name].mean():.3f}" for name in MODELS))
    print(f"\n{time.perf_counter() - start:.0f} s; cohorts under {work}")


if __name__ == "__main__":
    main()
