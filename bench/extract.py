"""Benchmark: ``myelofed site extract`` against plain single-process pyradiomics.

Both run on the shared soft-tissue-sarcoma NIfTI volumes (CT, T1 MR and PET of every patient)
with the same settings per modality (resampling, re-segmentation, bin width, all feature
classes), each as a fresh process, so both pay their imports. Prints cases/s, the speed-up ratio
(goal >= 1.8x on 2 cores) and the peak resident memory of the whole process tree.

    python bench/extract.py [--workers N] [--repeat N] [--data ../shared/data/sts/nifti]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.protocol import StudyProtocol, load_protocol, protocol_from_mapping  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sts" / "nifti"


def protocols() -> dict[str, StudyProtocol]:
    """One protocol per modality; label-only manifests, no covariates. Every protocol extracts
    the usual radiomics set: original, LoG (1, 2, 3 mm) and wavelet images, all classes."""
    image_types = {"original": True, "log_sigma_mm": [1.0, 2.0, 3.0], "wavelet": True}
    plain = {"covariates": {}, "batch_column": None,
             "task": {"kind": "classification", "label_column": "label"}}
    ct = load_protocol("preset:ibsi_ct_c").model_dump(mode="python")
    pet = load_protocol("preset:pet_ct").model_dump(mode="python")
    mr = {"name": "bench-mr", "modality": "MR",
          "standardization": {"resample": {"spacing_mm": [2.0, 2.0, 2.0]}},
          "radiomics": {"bin_width": 25.0}}
    out = {}
    for name, spec in (("CT", ct), ("MR_T1", mr), ("PET", pet)):
        radiomics = {**spec.get("radiomics", {}), "image_types": image_types}
        out[name] = protocol_from_mapping({**spec, **plain, "radiomics": radiomics})
    return out


def write_inputs(data: Path, work: Path, repeat: int = 1) -> dict[str, tuple[Path, Path, int]]:
    """Per modality: (manifest, protocol file, number of cases). ``repeat`` lists every volume
    that many times under distinct case ids, as a larger site would have."""
    out = {}
    for modality, protocol in protocols().items():
        rows = ["case_id,image,mask,label"]
        for patient in sorted(p for p in data.iterdir() if p.is_dir()):
            image = patient / f"{modality}_image.nii.gz"
            mask = patient / f"{modality}_mask.nii.gz"
            if image.is_file() and mask.is_file():
                for copy in range(repeat):
                    rows.append(f"{patient.name}_{copy},{image},{mask},{len(rows) % 2}")
        manifest = work / f"{modality}.csv"
        manifest.write_text("\n".join(rows) + "\n")
        proto_file = work / f"{modality}.yaml"
        proto_file.write_text(yaml.safe_dump(protocol.model_dump(mode="json")))
        out[modality] = (manifest, proto_file, len(rows) - 1)
    return out


def run_measured(cmd: list[str]) -> tuple[float, float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS of the process tree in MiB, exit code)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode not in (0, 3):
        print(err[-2000:], file=sys.stderr)
    return wall, peak / 2**20, proc.returncode


def baseline(manifest: Path, protocol_file: Path) -> None:
    """Plain pyradiomics, one process, the same settings (its own resampling and
    re-segmentation, which IBSI-wise differ, but cost the same)."""
    import csv
    import logging

    import radiomics
    from radiomics import featureextractor

    from client.extract import pyradiomics_settings

    radiomics.setVerbosity(logging.ERROR)
    protocol = load_protocol(protocol_file)
    settings = pyradiomics_settings(protocol.radiomics)
    std = protocol.standardization
    if std.resample is not None:
        settings["resampledPixelSpacing"] = list(std.resample.spacing_mm)
        settings["interpolator"] = {"linear": "sitkLinear", "bspline": "sitkBSpline",
                                    "nearest": "sitkNearestNeighbor"}[std.resample.interpolation]
    if std.resegmentation_range is not None:
        low, high = std.resegmentation_range
        settings["resegmentRange"] = [low] if high == float("inf") else [low, high]
    extractor = featureextractor.RadiomicsFeatureExtractor(**settings)
    types = protocol.radiomics.image_types
    image_types: dict[str, dict] = {"Original": {}} if types.original else {}
    if types.log_sigma_mm:
        image_types["LoG"] = {"sigma": list(types.log_sigma_mm)}
    if types.wavelet:
        image_types["Wavelet"] = {}
    extractor.disableAllImageTypes()
    extractor.enableImageTypes(**image_types)
    extractor.disableAllFeatures()
    extractor.enableFeaturesByName(**{k: list(v) for k, v in
                                      protocol.radiomics.feature_classes.items()})
    with manifest.open() as fh:
        for row in csv.DictReader(fh):
            extractor.execute(row["image"], row["mask"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=1,
                        help="list every volume this many times (a larger site); default 1")
    parser.add_argument("--baseline", nargs=2, type=Path, metavar=("MANIFEST", "PROTOCOL"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        baseline(*args.baseline)
        return
    if not args.data.is_dir():
        sys.exit(f"shared STS data not found at {args.data}")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = write_inputs(args.data, work, args.repeat)
        total_cases = sum(n for _, _, n in inputs.values())
        ours_wall = base_wall = 0.0
        ours_peak = base_peak = 0.0
        print(f"{'modality':8} {'cases':>5} {'pyradiomics s':>14} {'myelofed s':>11} {'ratio':>6}")
        for modality, (manifest, proto, n) in inputs.items():
            b_wall, b_peak, b_rc = run_measured(
                [sys.executable, __file__, "--baseline", str(manifest), str(proto)])
            o_wall, o_peak, o_rc = run_measured(
                [sys.executable, "-m", "cli.main", "site", "extract", "-p", str(proto),
                 "-m", str(manifest), "-o", str(work / f"out_{modality}"), "--no-cache",
                 "-j", str(args.workers)])
            if b_rc != 0 or o_rc not in (0, 3):
                sys.exit(f"{modality}: a run failed (baseline {b_rc}, myelofed {o_rc})")
            print(f"{modality:8} {n:5d} {b_wall:14.1f} {o_wall:11.1f} {b_wall / o_wall:6.2f}")
            ours_wall += o_wall
            base_wall += b_wall
            ours_peak = max(ours_peak, o_peak)
            base_peak = max(base_peak, b_peak)
        print(f"\n{total_cases} cases ({args.repeat}x each volume), {args.workers} workers, "
              f"{os.cpu_count()} cores; original + LoG(1,2,3 mm) + wavelet, all classes")
        print(f"plain pyradiomics (1 process): {total_cases / base_wall:.2f} cases/s, "
              f"peak RSS {base_peak:.0f} MiB")
        print(f"myelofed site extract:         {total_cases / ours_wall:.2f} cases/s, "
              f"peak RSS {ours_peak:.0f} MiB (all processes)")
        print(f"speed-up: {base_wall / ours_wall:.2f}x (goal >= 1.8x on 2 cores)")


if __name__ == "__main__":
    main()
