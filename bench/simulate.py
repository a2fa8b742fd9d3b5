"""Benchmark: how fast ``myelofed simulate`` makes a cohort, and whether it scales linearly.

Runs the CLI as a fresh process (imports included) for the default cohort (40/70/110 patients)
and for cohorts k times larger, in NIfTI and in DICOM + SEG; prints seconds, patients/s and the
time ratio against the default size (linear scaling: ratio ~ k). Goal: the default cohort in
under a minute on two cores.

    python bench/simulate.py [--scales 1 2] [--formats nifti both] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = (40, 70, 110)


def run(out: Path, scale: int, file_format: str, workers: int) -> float:
    sizes = ",".join(str(n * scale) for n in DEFAULT)
    cmd = [sys.executable, "-m", "cli.main", "simulate", "-o", str(out), "--patients", sizes,
           "--format", file_format, "--workers", str(workers)]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--formats", nargs="+", default=["nifti", "both"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(f"{'format':8} {'patients':>8} {'seconds':>8} {'patients/s':>10} {'ratio':>6}")
    for file_format in args.formats:
        base = None
        for scale in args.scales:
            with tempfile.TemporaryDirectory() as tmp:
                seconds = run(Path(tmp) / "cohort", scale, file_format, args.workers)
            n = sum(DEFAULT) * scale
            base = base or seconds / scale
            print(f"{file_format:8} {n:8d} {seconds:8.1f} {n / seconds:10.1f} "
                  f"{seconds / base:6.2f}")
    print(f"{args.workers} worker(s), {os.cpu_count()} cores; goal: the default cohort "
          f"({sum(DEFAULT)} patients) in under 60 s; ratio ~ the scale for linear scaling")


if __name__ == "__main__":
    main()
