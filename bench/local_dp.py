"""What local differential privacy costs the CNN: its test AUC with and without the noise.

Runs the image-only study (the CNN alone) on the default synthetic cohort in Flower's simulation
engine, once without local DP (the baseline) and once per ``--epsilon`` x ``--clipping-norm``
setting (``cnn.local_dp``, delta 1e-5), with the same seed, split and rounds. Prints each
site's test AUC of the final global model, their mean, its ratio to the baseline's, the noise
every weight gets per round and each site's total epsilon over the rounds.

    python bench/local_dp.py [--rounds 5] [--epsilon 1.0] [--clipping-norm 0.01 0.1] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.protocol import CnnSpec, LocalDpSpec, load_protocol  # noqa: E402
from common.synthetic import CohortSpec, make_sites, read_cohort_spec, write_cohort  # noqa: E402
from server.app import run_in_simulation  # noqa: E402
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
        report, seconds = run(cohort, work / f"study{i}", args.rounds, dp)
        aucs = {site: m.get("test_auc") for site, m in sorted(report["final"].items())}
        rows.append((dp, aucs, seconds))
        for site, why in sorted(report["failed"].items()):
            print(f"{'none' if dp is None else dp}: {site} failed: {why}")

    sites = sorted(rows[0][1])
    baseline = sum(rows[0][1].values()) / len(sites)
    print(f"\nCNN test AUC of the final global model ({args.rounds} rounds, default cohort, "
          f"seed 0)")
    print(f"{'local DP':<28} {'noise sd':>9} " + " ".join(f"{s:>7}" for s in sites)
          + f" {'mean':>6} {'x base':>7} {'epsilon/site':>13} {'s':>5}")
    for dp, aucs, seconds in rows:
        values = [aucs.get(s, float("nan")) for s in sites]  # NaN: the site's model failed
        mean = sum(values) / len(values)
        name = "none (baseline)" if dp is None else f"eps {dp.epsilon:g}, C {dp.clipping_norm:g}"
        noise = "-" if dp is None else f"{dp.noise_std:.3g}"
        spend = "-" if dp is None else f"{dp.epsilon * args.rounds:g}"
        print(f"{name:<28} {noise:>9} " + " ".join(f"{v:7.3f}" for v in values)
              + f" {mean:6.3f} {mean / baseline:6.2f}x {spend:>13} {seconds:5.0f}")
    print(f"\ncohort and outputs: {work}")


if __name__ == "__main__":
    main()
