"""The federated segmentation network (issue 17) against the synthetic cohort's own masks.

For each cohort (``--cohorts SEED:SIZES``, MR diagnosis, scanner effects on) the study's
segmentation phase runs over Flower's simulation engine (``until = "segmentation"``), with
the protocol's default network and ``--rounds`` rounds:

* **every site with its masks**: each site's test Dice and HD95 per label (marrow ROI, muscle),
  as the study reports them (its held-out masks, never seen in training);
* **leave one site out**: once per site, that site's masks hidden (``mask = auto``): the
  network is trained by the others alone and the site segments its cases with it; its masks
  against the hidden hand-drawn ones (Dice, and the share that passed quality control);
* **feature agreement**: at each site, the test cases' radiomic features from the network's
  mask and from the hand-drawn one (the study's extraction), ICC(3,1) per feature over the
  pooled test cases, and the share of features with ICC >= 0.75.

    python bench/segmentation.py [--rounds 10] [--cohorts 0:40,70,110 ...] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loso_harmonization import DEFAULT_COHORTS, Cohort  # noqa: E402
from client.loading import load_case  # noqa: E402
from client.manifest import read_manifest  # noqa: E402
from client.phases.segmentation import segmentation_cases  # noqa: E402
from client.segment.masks import AUTO_MASKS_FILE, SEGMENTATION_DIR  # noqa: E402
from client.segment.quality import agreement  # noqa: E402
from client.segment.site import feature_icc, paired_features, segment_case  # noqa: E402
from common.metrics.agreement import GOOD_ICC  # noqa: E402
from common.protocol import SegmentationSpec, StudyProtocol, load_protocol  # noqa: E402
from common.segmenter import SegmenterLabels, load_segmenter  # noqa: E402
from common.site_config import SiteConfig  # noqa: E402
from common.synthetic import CohortSpec, make_sites, write_cohort  # noqa: E402
from common.synthetic.variants import without_masks  # noqa: E402
from harmonization.combat.design import CombatOptions  # noqa: E402
from server.study import StudySettings  # noqa: E402

SEED = 1  # the study seed (splits and initial weights): not tuned


def study_protocol(cohort_dir: Path, rounds: int) -> StudyProtocol:
    protocol = load_protocol(cohort_dir / "study.yaml")
    return StudyProtocol.model_validate(protocol.model_copy(update={
        "cnn": None, "segmentation": SegmentationSpec(rounds=rounds)}).model_dump())


def run_study(cohort_dir: Path, protocol: StudyProtocol, out: Path, n_sites: int) -> float:
    """The study over Flower's simulation engine until its segmentation phase; wall seconds."""
    from flwr.simulation import run_simulation  # deferred: Flower's engine starts Ray

    from client.app import make_client_app  # deferred: imports the engine's records
    from server.app import make_server_app

    shutil.rmtree(cohort_dir / "work", ignore_errors=True)
    settings = StudySettings(protocol, out, min_sites=2, timeout_s=1200, seed=SEED,
                             combat=CombatOptions(min_batch_size=3, min_cell=1),
                             until="segmentation")
    start = time.perf_counter()
    run_simulation(server_app=make_server_app(settings, lambda _: None),
                   client_app=make_client_app(cohort_dir, min_patients=1),
                   num_supernodes=n_sites, backend_config={"client_resources": {"num_cpus": 1}})
    status = json.loads((out / "study.json").read_text())
    if status["status"] != "done":
        raise RuntimeError(f"the study did not finish: {status}")
    return time.perf_counter() - start


def left_out_dice(cohort_dir: Path, hidden_dir: Path, protocol: StudyProtocol, site: str
                  ) -> dict[str, float]:
    """The masks a site made with the network trained without it, against its hidden ones."""
    labels = SegmenterLabels.of(protocol)
    study = hidden_dir / "work" / site / "study" / protocol.short_hash / SEGMENTATION_DIR
    made = json.loads((study / AUTO_MASKS_FILE).read_text())["cases"]
    cases, _ = read_manifest(cohort_dir / site / "manifest.csv", protocol, site)
    dice = {v: [] for v in labels.values}
    for case in cases:
        entry = made[case.case_id]
        if "mask" not in entry:
            continue
        truth = load_case(case, protocol).labels
        for v, (d, _) in agreement(sitk.ReadImage(entry["mask"]), truth, labels).items():
            dice[v].append(d)
    return {**{f"dice_{v}": float(np.mean(d)) for v, d in dice.items()},
            "passed_qc": len(dice[labels.values[0]]) / len(cases)}


def pooled_icc(cohort_dir: Path, out: Path, protocol: StudyProtocol, sites: list[str],
               work: Path) -> tuple[np.ndarray, list[str]]:
    """ICC(3,1) per feature over every site's segmentation test cases pooled: the features of
    the network's mask against those of the hand-drawn one (the pairs each site's study
    evaluation measures, :func:`client.segment.site.paired_features`)."""
    header, network = load_segmenter(out / SEGMENTATION_DIR / "segmenter.npz", protocol)
    kept = []
    for site in sites:
        config = SiteConfig(site_name=site, manifest=cohort_dir / site / "manifest.csv",
                            work_dir=work / site, workers=2)
        pairs = []
        for case in segmentation_cases(config, protocol, SEED, 0.3).test:
            result = segment_case(case, protocol, header, network, config.budget,
                                  torch.device("cpu"))
            if result.mask is not None:
                pairs.append((case, result.mask))
        kept += paired_features(pairs, protocol, config, work / "auto")
    return feature_icc(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cohorts", nargs="+", default=list(DEFAULT_COHORTS))
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="myelofed-bench-segmentation-"))
    start = time.perf_counter()
    lines = []
    for cohort in map(Cohort.parse, args.cohorts):
        cohort_dir = work / f"cohort_{cohort.seed}"
        if not (cohort_dir / "cohort.json").is_file():
            write_cohort(cohort_dir, CohortSpec(make_sites(cohort.sizes, True), seed=cohort.seed),
                         workers=2)
        protocol = study_protocol(cohort_dir, args.rounds)
        sites = [f"site_{chr(ord('A') + i)}" for i in range(len(cohort.sizes))]
        out = work / f"out_{cohort.seed}"
        seconds = run_study(cohort_dir, protocol, out, len(sites))
        final = json.loads((out / "segmentation.json").read_text())["final"]
        print(f"\n{cohort.name}: the study's segmentation phase, {args.rounds} rounds, "
              f"{seconds:.0f} s", flush=True)
        print("site     test n  marrow Dice [CI]        muscle Dice [CI]        "
              "marrow HD95 mm  LOSO marrow  LOSO muscle  LOSO passed QC")
        for site in sites:
            m = final[site]
            hidden = without_masks(cohort_dir, work / f"hidden_{cohort.seed}_{site}", {site})
            run_study(hidden, protocol, work / f"out_{cohort.seed}_{site}", len(sites))
            loso = left_out_dice(cohort_dir, hidden, protocol, site)
            row = (f"{site}  {int(m['test_n']):6d}  {m['label_1_dice']:.3f} "
                   f"[{m['label_1_dice_low']:.3f}, {m['label_1_dice_high']:.3f}]  "
                   f"{m['label_2_dice']:.3f} [{m['label_2_dice_low']:.3f}, "
                   f"{m['label_2_dice_high']:.3f}]  {m['label_1_hd95']:14.2f}  "
                   f"{loso['dice_1']:11.3f}  {loso['dice_2']:11.3f}  {loso['passed_qc']:14.0%}")
            print(row, flush=True)
            lines.append({"cohort": cohort.name, "site": site, **m, **{
                f"loso_{k}": v for k, v in loso.items()}})
        icc, names = pooled_icc(cohort_dir, out, protocol, sites, work / f"icc_{cohort.seed}")
        good = float(np.mean(icc[np.isfinite(icc)] >= GOOD_ICC))
        print(f"feature agreement (automatic vs hand-drawn masks, the test cases of every "
              f"site): ICC(3,1) >= {GOOD_ICC} for {good:.0%} of {len(names)} features "
              f"(median ICC {np.nanmedian(icc):.3f})", flush=True)
        lines.append({"cohort": cohort.name, "icc_good_share": good,
                      "icc_median": float(np.nanmedian(icc))})
    (work / "segmentation_bench.json").write_text(json.dumps(lines, indent=1))
    print(f"\n{time.perf_counter() - start:.0f} s in all; figures in "
          f"{work / 'segmentation_bench.json'}")


if __name__ == "__main__":
    main()
