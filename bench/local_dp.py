"""What local differential privacy costs the CNN: its test AUC with and without the noise.

Runs the image-only study (the CNN alone) on the default synthetic cohort in Flower's simulation
engine, once without local DP (the baseline) and once per ``--epsilon`` x ``--clipping-norm``
setting (``cnn.local_dp``, delta 1e-5), with the same seed, split and rounds; the noise is
drawn afresh in each study, so each DP setting runs ``--repeats`` times. Prints each site's test
AUC of the final global model, their mean, its ratio to the baseline's, the noise every weight
gets per round and each site's total epsilon over the rounds.

    python bench/local_dp.py [--rounds 5] [--epsilon 1.0] [--clipping-norm 0.01 0.1]
                             [--repeats 5] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.simulation import run_in_simulation  # noqa: E402
from common.protocol import CnnSpec, LocalDpSpec, load_protocol  # noqa: E402
from common.synthetic import CohortSpec, make_sites, read_cohort_spec, write_cohort  # noqa: E402
from server.study import StudySettings  # noqa: E402


def run(cohort: Path, out: Path, rounds: int, dp: LocalDpSpec | None) -> tuple[dict, float]:
    protocol = load_protocol(cohort / "study.yaml")
    protocol = protocol.model_copy(update={"cnn": CnnSpec(**{
        **protocol.cnn.model_dump(), "rounds": rounds, "local_dp": dp})})
    settings = StudySettings(protocol, out, min_sites=2, timeout_s=600, seed=0,
                             radiomics=False)
    start = time.perf_counter()
    run_in_simulation(cohort, settings, lambda _: None)
    seconds = time.perf_counter() - start
    return json.loads((out / "cnn.json").read_text()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epsilon", type=float, nargs="+", default=[1.0])
    parser.add_argument("--clipping-norm", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--repeats", type=int, default=5,
                        help="studies per DP setting (the noise is drawn afresh each time)")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="myelofed-bench-dp-"))
    cohort = work / "cohort"
    if read_cohort_spec(cohort) is None:
        write_cohort(cohort, CohortSpec(make_sites((40, 70, 110))), workers=2)  # the demo's

    settings = [None] + [LocalDpSpec(epsilon=e, delta=1e-5, clipping_norm=c)
                         for e in args.epsilon for c in args.clipping_norm]
    rows = []
    for i, dp in enumerate(settings):
        runs = []  # per repeat: each site's test AUC (NaN where its model failed)
        for repeat in range(1 if dp is None else args.repeats):
            report, seconds = run(cohort, work / f"study{i}-{repeat}", args.rounds, dp)
            runs.append({site: report["final"].get(site, {}).get("test_auc", float("nan"))
                         for site in sorted(report["final"].keys() | report["failed"].keys())})
            for site, why in sorted(report["failed"].items()):
                print(f"{'no DP' if dp is None else dp}: {site} failed: {why}")
        rows.append((dp, runs, seconds))

    sites = sorted(rows[0][1][0])
    baseline = float(np.mean([rows[0][1][0][s] for s in sites]))
    print(f"\nCNN test AUC of the final global model ({args.rounds} rounds, default cohort, "
          f"seed 0; with DP, the mean of {args.repeats} studies and the SD of the site mean)")
    print(f"{'local DP':<18} {'noise sd':>9} " + " ".join(f"{s:>7}" for s in sites)
          + f" {'mean':>6} {'SD':>6} {'x base':>7} {'eps/site':>9} {'s/study':>8}")
    for dp, runs, seconds in rows:
        table = np.array([[r.get(s, np.nan) for s in sites] for r in runs])
        means = table.mean(axis=1)
        name = "none (baseline)" if dp is None else f"eps {dp.epsilon:g}, C {dp.clipping_norm:g}"
        noise = "-" if dp is None else f"{dp.noise_std:.3g}"
        spend = "-" if dp is None else f"{dp.epsilon * args.rounds:g}"
        sd = "-" if len(runs) == 1 else f"{means.std(ddof=1):.3f}"
        print(f"{name:<18} {noise:>9} " + " ".join(f"{v:7.3f}" for v in table.mean(axis=0))
              + f" {means.mean():6.3f} {sd:>6} {means.mean() / baseline:6.2f}x {spend:>9}"
              f" {seconds:8.0f}")
    print(f"\ncohort and outputs: {work}")


if __name__ == "__main__":
    main()
