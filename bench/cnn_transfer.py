"""The CNN's weights in half precision on the wire (``cnn.transfer = float16``, issue 16):
bytes per round against float32, and the final model's test AUC at every site.

One cohort (the demo's sizes by default) is written once; then for each of ``--studies`` study
seeds (each its own train/test split and initial network) the CNN phase runs in Flower's
simulation engine (the study's strategies and messages) twice, with float32 and with float16
transfer, everything else equal. The extraction is first-order only (it is not what is measured;
the crops are standardized as the protocol says). It prints the bytes one model costs on the
wire each way, each site's final test AUC under both and their difference, mean over the
studies, and whether the issue's goal holds: bytes <= 0.52x float32, AUC within 0.01 of float32
at every site (mean over the studies).

    python bench/cnn_transfer.py [--studies 3] [--sizes 40,70,110] [--work DIR]
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

import pandas as pd  # noqa: E402

from cli.simulation import run_in_simulation  # noqa: E402
from common.protocol import RadiomicsSpec, load_protocol  # noqa: E402
from common.synthetic import CohortSpec, make_sites, read_cohort_spec, write_cohort  # noqa: E402
from server.study import StudySettings  # noqa: E402

TRANSFERS = ("float32", "float16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--sizes", default="40,70,110", help="patients per site")
    parser.add_argument("--work", type=Path, default=None, help="kept here (reused)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="myelofed-bench-transfer-"))
    cohort = work / "cohort"
    if read_cohort_spec(cohort) is None:
        sizes = tuple(int(s) for s in args.sizes.split(","))
        write_cohort(cohort, CohortSpec(make_sites(sizes, True)), workers=2)
    base = load_protocol(cohort / "study.yaml")
    assert base.cnn is not None, "the cohort's protocol has a CNN"
    start, rows, bytes_ = time.perf_counter(), [], {}
    for seed in range(1, args.studies + 1):
        for transfer in TRANSFERS:
            protocol = base.model_copy(update={
                "radiomics": RadiomicsSpec(feature_classes={"firstorder": ()}),
                "cnn": base.cnn.model_copy(update={"transfer": transfer})})
            out = work / f"study-{seed}-{transfer}"
            settings = StudySettings(protocol, out, min_sites=3, seed=seed, until="cnn",
                                     radiomics=False)
            run_in_simulation(cohort, settings, lambda _: None)
            report = json.loads((out / "cnn.json").read_text())
            bytes_[transfer] = (report["wire_bytes"], report["weights_bytes"])
            for site, metrics in report["final"].items():
                rows.append({"study": seed, "transfer": transfer, "site": site,
                             "auc": metrics["test_auc"]})
            print(f"study {seed}, {transfer}: done ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    wire, raw = bytes_["float16"]
    ratio = wire / raw
    print(f"\none model on the wire, each way each round: float32 {raw:,} bytes, float16 "
          f"{wire:,} bytes ({ratio:.3f}x; goal <= 0.52x)")
    table = pd.DataFrame(rows).pivot_table(index=["study", "site"], columns="transfer",
                                           values="auc")
    table["difference"] = table["float16"] - table["float32"]
    print("\nfinal CNN test AUC per study and site\n" + table.to_string(
        float_format=lambda v: f"{v:.3f}"))
    mean = table.groupby(level="site").mean()
    print(f"\nmean over {args.studies} studies\n" + mean.to_string(
        float_format=lambda v: f"{v:.3f}"))
    holds = ratio <= 0.52 and bool((mean["difference"].abs() <= 0.01).all())
    print(f"\nbytes <= 0.52x and |AUC difference| <= 0.01 at every site: "
          f"{'yes' if holds else 'no'}; largest single-study difference "
          f"{table['difference'].abs().max():.3f}")
    print(f"\n{time.perf_counter() - start:.0f} s; cohort and studies under {work}")


if __name__ == "__main__":
    main()
