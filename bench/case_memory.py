"""Benchmark: one case's peak memory per voxel, the figure behind ``client.limits.BYTES_PER_VOXEL``
(the site's ``max_case_memory_mb`` estimate).

For each preset and grid size, a fresh process extracts a warm-up case, then one synthetic case
(noise, a spherical ROI of ``--roi`` of the grid, a reference-tissue strip) already on the
preset's spacing; the growth of the process's peak RSS over the case is divided by the grid's
voxels. Prints one line per run and the largest bytes per voxel against the limit's constant.

    python bench/case_memory.py [--sizes 128 256] [--roi 0.05] [--presets wb_ldct pet_ct]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_CHILD = r"""
import json, resource, sys, tempfile
from pathlib import Path
import numpy as np, SimpleITK as sitk
sys.path.insert(0, sys.argv[4])
from client.manifest import CaseSpec
from client.pipeline import CaseProcessor
from common.protocol import load_protocol

preset, n, roi = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
protocol = load_protocol(f"preset:{preset}")
spacing = protocol.standardization.resample.spacing_mm if protocol.standardization.resample \
    else (1.0, 1.0, 1.0)

def write(shape, folder):
    rng = np.random.default_rng(0)
    array = rng.normal(100, 20, size=shape[::-1]).astype(np.float32)
    z, y, x = np.indices(shape[::-1])
    centre = np.array(shape[::-1]) / 2
    radius = (roi * np.prod(shape) * 3 / (4 * np.pi)) ** (1 / 3)
    mask = (((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
            <= radius ** 2).astype(np.uint8)
    mask[(mask == 0) & (np.abs(x - centre[2]) < 3)] = 2  # reference tissue (MR normalization)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    labels = sitk.GetImageFromArray(mask)
    labels.CopyInformation(image)
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    sitk.WriteImage(labels, str(folder / "mask.nii.gz"))

with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    spec = CaseSpec(case_id="bench", row=2, image=folder / "image.nii.gz",
                    mask=folder / "mask.nii.gz", label=1.0, batch="s")
    processor = CaseProcessor(protocol, "extract", None)
    write((16, 16, 8), folder)
    assert processor(spec).ok
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shape = (n, n, max(8, n // 2))
    write(shape, folder)
    outcome = processor(spec)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    voxels = int(np.prod(shape))
    print(json.dumps({"preset": preset, "voxels": voxels, "ok": outcome.ok,
                      "peak_growth_mb": grown / 1024, "bytes_per_voxel": grown * 1024 / voxels,
                      "seconds": outcome.seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--roi", type=float, default=0.05)
    parser.add_argument("--presets", nargs="+", default=["wb_ldct", "spine_mri_t1w", "pet_ct"])
    args = parser.parse_args()
    from client.limits import BYTES_PER_VOXEL, ESTIMATE_BASE_MB

    tightest = float("inf")
    for size in args.sizes:
        for preset in args.presets:
            run = subprocess.run([sys.executable, "-c", _CHILD, preset, str(size), str(args.roi),
                                  str(ROOT)], capture_output=True, text=True, check=True)
            r = json.loads(run.stdout.strip().splitlines()[-1])
            estimate = ESTIMATE_BASE_MB + r["voxels"] * BYTES_PER_VOXEL / 2 ** 20
            tightest = min(tightest, estimate / r["peak_growth_mb"])
            print(f"{preset:>14} {r['voxels']:>11,} voxels  peak +{r['peak_growth_mb']:7.1f} MB"
                  f"  {r['bytes_per_voxel']:6.1f} B/voxel  estimate {estimate:7.1f} MB"
                  f"  {r['seconds']:6.1f} s")
    print(f"estimate / measured peak, lowest: {tightest:.2f} (>= 1: the estimate covers every "
          "run)")


if __name__ == "__main__":
    main()
