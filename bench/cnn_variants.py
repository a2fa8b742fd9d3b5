"""The CNN's federation variants against plain float32 FedAvg (issue 16): half-precision
transfer (``cnn.transfer = float16``), FedBN (``cnn.local_norm``) and the final model fine-tuned
at each site (``cnn.fine_tune_epochs``), the test AUC at every site, and the bytes per round.

One cohort (the demo's sizes by default) is written once; then for each of ``--studies`` study
seeds (each its own train/test split and initial network) the CNN phase runs in Flower's
simulation engine (the study's strategies and messages) once per variant, everything else equal:
``float32`` (the baseline), ``float16`` and ``fedbn``; ``finetuned`` and ``updated`` are no
federation of their own: the baseline study fine-tunes its final model at each site (``--fine-
tune-epochs``) after scoring it, and that model's AUC is ``finetuned``'s; the model the site chose
between the two on its held-out training crops is ``updated``. The extraction is first-order only
(it is not what is measured); the crops are standardized as the protocol says but without
histogram standardization, whose standard changes with every split and would make every study
extract again. A study already run under ``--work`` is read back. It prints the bytes one model
costs on the wire each way, each site's final test AUC per variant and its difference from the
baseline, mean over the studies, and whether the issue's goals hold: float16 <= 0.52x the bytes
with the AUC within 0.01 of float32 at every site; FedBN, and fine-tuning, at least float32 FedAvg
at every site. With float16 it also measures what the rounding does by itself (:func:`rounding`).

    python bench/cnn_variants.py [--studies 3] [--variants float16 fedbn finetuned updated]
                                 [--fine-tune-epochs 2] [--sizes 40,70,110] [--work DIR]
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

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cli.simulation import run_in_simulation  # noqa: E402
from common.protocol import RadiomicsSpec, load_protocol  # noqa: E402
from common.synthetic import CohortSpec, make_sites, read_cohort_spec, write_cohort  # noqa: E402
from server.study import StudySettings  # noqa: E402

BASELINE = "float32"
#: Each variant's changes to the protocol's ``cnn`` section.
VARIANTS = {BASELINE: {}, "float16": {"transfer": "float16"}, "fedbn": {"local_norm": True}}
#: Read from the baseline study: its final model fine-tuned at each site, and the model each
#: site chose between that and the global one on its held-out training crops.
FINE_TUNED = {"finetuned": "finetuned_test_auc", "updated": "updated_test_auc"}


def study(cohort: Path, out: Path, seed: int, changes: dict[str, object]) -> dict:
    """One CNN study (its ``cnn.json``), run unless ``out`` holds it already."""
    if not (out / "cnn.json").is_file():
        base = load_protocol(cohort / "study.yaml")
        assert base.cnn is not None, "the cohort's protocol has a CNN"
        protocol = base.model_copy(update={
            "standardization": base.standardization.without_study_standard(),
            "radiomics": RadiomicsSpec(feature_classes={"firstorder": ()}),
            "cnn": base.cnn.model_copy(update=changes)})
        run_in_simulation(cohort, StudySettings(protocol, out, min_sites=3, seed=seed,
                                                until="cnn", radiomics=False), lambda _: None)
    return json.loads((out / "cnn.json").read_text())


def rounding(cohort: Path, work: Path, seed: int) -> None:
    """What the half precision does by itself, apart from the training it then takes: the last
    float32 study's final model scored at every site as it is and rounded to float16 and back
    (the sites' crops are that study's), and how far the float16 study's global model is from
    the float32 one after the first and the last round."""
    from client.cnn.evaluate import evaluate_arrays
    from common.protocol import protocol_from_mapping
    from common.site_config import SiteConfig
    from common.wire import from_wire, to_wire

    def load(variant: str, round_index: int) -> dict[str, np.ndarray]:
        path = work / f"study-{seed}-{variant}" / "cnn" / f"global_round_{round_index:03d}.npz"
        with np.load(path) as saved:
            return {k: saved[k].astype(np.float64) for k in saved.files}

    out = work / f"study-{seed}-{BASELINE}"
    protocol = protocol_from_mapping(json.loads((out / "protocol.json").read_text())["protocol"],
                                     str(out / "protocol.json"))
    assert protocol.cnn is not None
    for round_index in (1, protocol.cnn.rounds):
        a, b = load(BASELINE, round_index), load("float16", round_index)
        gap = np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a) / sum(np.sum(a[k] ** 2)
                                                                       for k in a))
        print(f"study {seed}, round {round_index}: the float16 study's global model is "
              f"{gap:.1%} (relative L2) from the float32 one")
    final = {k: v.astype(np.float32) for k, v in load(BASELINE, protocol.cnn.rounds).items()}
    rounded = from_wire(to_wire(final, "float16"))
    for site in sorted(p.parent.name for p in cohort.glob("*/manifest.csv")):
        config = SiteConfig(site_name=site, manifest=cohort / site / "manifest.csv",
                            work_dir=cohort / "work" / site)
        auc = [evaluate_arrays(config, protocol, w, include_train=False).test.auc
               for w in (final, rounded)]
        print(f"{site}: the float32 model {auc[0]:.4f}, the same model rounded to float16 "
              f"{auc[1]:.4f} (difference {auc[1] - auc[0]:+.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["float16", "fedbn", *FINE_TUNED],
                        choices=[*(v for v in VARIANTS if v != BASELINE), *FINE_TUNED])
    parser.add_argument("--fine-tune-epochs", type=int, default=2,
                        help="the baseline study's cnn.fine_tune_epochs (with 'finetuned' or "
                        "'updated')")
    parser.add_argument("--sizes", default="40,70,110", help="patients per site")
    parser.add_argument("--work", type=Path, default=None, help="kept here (reused)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="myelofed-bench-cnn-"))
    cohort = work / "cohort"
    if read_cohort_spec(cohort) is None:
        sizes = tuple(int(s) for s in args.sizes.split(","))
        write_cohort(cohort, CohortSpec(make_sites(sizes, True)), workers=2)
    variants = [BASELINE, *args.variants]
    tune = ({"fine_tune_epochs": args.fine_tune_epochs} if set(FINE_TUNED) & set(args.variants)
            else {})
    start, rows, wire = time.perf_counter(), [], {}
    for seed in range(1, args.studies + 1):
        for variant in (v for v in variants if v not in FINE_TUNED):
            changes = {**VARIANTS[variant], **(tune if variant == BASELINE else {})}
            report = study(cohort, work / f"study-{seed}-{variant}", seed, changes)
            wire[variant] = (report["wire_bytes"], report["weights_bytes"])
            rows += [{"study": seed, "variant": variant, "site": site,
                      "auc": metrics["test_auc"]} for site, metrics in report["final"].items()]
            if variant == BASELINE and tune:
                rows += [{"study": seed, "variant": name, "site": site, "auc": metrics[key]}
                         for name, key in FINE_TUNED.items() if name in args.variants
                         for site, metrics in report["final"].items()]
            print(f"study {seed}, {variant}: done ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    raw = wire[BASELINE][0]
    print("\none model on the wire, each way each round: " + ", ".join(
        f"{v} {b:,} bytes ({b / raw:.3f}x)" for v, (b, _) in wire.items()))
    table = pd.DataFrame(rows).pivot_table(index=["study", "site"], columns="variant",
                                           values="auc")[variants]
    for variant in args.variants:
        table[f"{variant} - {BASELINE}"] = table[variant] - table[BASELINE]
    print("\nfinal CNN test AUC per study and site\n" + table.to_string(
        float_format=lambda v: f"{v:.3f}"))
    mean = table.groupby(level="site").mean()
    print(f"\nmean over {args.studies} studies\n" + mean.to_string(
        float_format=lambda v: f"{v:.3f}"))
    if "float16" in args.variants:
        ratio = wire["float16"][0] / raw
        close = bool((mean[f"float16 - {BASELINE}"].abs() <= 0.01).all())
        print(f"\nfloat16: {ratio:.3f}x the bytes (goal <= 0.52x), |AUC difference| <= 0.01 at "
              f"every site: {'yes' if close else 'no'} (largest in one study "
              f"{table[f'float16 - {BASELINE}'].abs().max():.3f})")
        rounding(cohort, work, args.studies)
    for variant in [v for v in ("fedbn", *FINE_TUNED) if v in args.variants]:
        holds = bool((mean[f"{variant} - {BASELINE}"] >= 0).all())
        print(f"{variant}: at least float32 FedAvg at every site: {'yes' if holds else 'no'}")
    print(f"\n{time.perf_counter() - start:.0f} s; cohort and studies under {work}")


if __name__ == "__main__":
    main()
