"""Benchmark: the site's 3D CNN, per local epoch and per evaluation, and the size of its weights.

One site of the default ``myelofed simulate`` size (70 patients, the middle hospital; change it
with ``--patients``) is written, prepared (first-order features only: extraction is not what is
measured here) and cropped; then, with the default :class:`CnnSpec` (or ``--architecture``), on
the CPU and on CUDA when present: seconds of one local epoch over the training crops (one round
with ``local_epochs = 1``, after a warm-up round) and of one evaluation (test and training
crops). Also the weights' raw size as float32 bytes, which the federated round benchmark
compares with the bytes it sends.

    python bench/cnn.py [--patients 70] [--repeat 2] [--architecture resnet10] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from client.cnn.crops import crop_path, prepare_crops  # noqa: E402
from client.cnn.evaluate import evaluate_arrays  # noqa: E402
from client.cnn.train import train_round  # noqa: E402
from client.phases.prepare import prepare  # noqa: E402
from common.network import build_network, float32_nbytes, state_arrays  # noqa: E402
from common.protocol import CnnSpec, RadiomicsSpec, StudyProtocol, load_protocol  # noqa: E402
from common.site_config import SiteConfig  # noqa: E402
from common.synthetic import CohortSpec, make_sites, write_cohort  # noqa: E402


def prepared_site(work: Path, patients: int, spec: CnnSpec, workers: int
                  ) -> tuple[SiteConfig, StudyProtocol]:
    """A synthetic site written and prepared under ``work``, with its protocol."""
    cohort = work / "cohort"
    if not (cohort / "study.yaml").is_file():
        write_cohort(cohort, CohortSpec(make_sites((patients,))), workers=workers)
    protocol = load_protocol(cohort / "study.yaml")
    protocol = protocol.model_copy(update={
        "radiomics": RadiomicsSpec(feature_classes={"firstorder": ()}), "cnn": spec})
    site = SiteConfig(site_name="site_A", manifest=cohort / "site_A" / "manifest.csv",
                      work_dir=work / "work", workers=workers)
    reply = prepare(site, protocol, seed=0, test_fraction=0.3)
    if reply.status != "ok":
        raise SystemExit(f"preparation refused: {reply.code} {reply.reason}")
    return site, protocol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=70)
    parser.add_argument("--repeat", type=int, default=2, help="timed rounds per device")
    parser.add_argument("--architecture", default=CnnSpec().architecture,
                        choices=["resnet10", "resnet18", "densenet121"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for crops, torch threads on the CPU")
    parser.add_argument("--work", type=Path, default=None, help="keep the cohort here")
    args = parser.parse_args()

    spec = CnnSpec(architecture=args.architecture)
    work = args.work or Path(tempfile.mkdtemp(prefix="myelofed-bench-cnn-"))
    site, protocol = prepared_site(work, args.patients, spec, args.workers)
    crop_path(site, protocol).unlink(missing_ok=True)  # time making them, then reading them
    start = time.perf_counter()
    crops = prepare_crops(site, protocol)
    fresh = time.perf_counter() - start
    start = time.perf_counter()
    prepare_crops(site, protocol)
    cached = time.perf_counter() - start
    n_train = sum(s == "train" for s in crops.splits)
    weights = state_arrays(build_network(spec, protocol.task.kind, seed=0))
    n_parameters = sum(p.numel() for p in build_network(spec, protocol.task.kind).parameters())

    print(f"site: {args.patients} patients ({n_train} train, {len(crops.splits) - n_train} "
          f"test, {len(crops.skipped)} skipped); crop (x, y, z) = {spec.crop_size}, "
          f"batch {spec.batch_size}, {spec.architecture}")
    print(f"crops: {fresh:.2f} s to make ({args.workers} workers), {cached:.3f} s from the cache")
    print(f"weights: {len(weights)} tensors, {n_parameters:,} parameters, "
          f"{float32_nbytes(weights):,} bytes as float32")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        train_round(site, protocol, weights, round_index=0, seed=0, device=device)  # warm-up
        epochs = [train_round(site, protocol, weights, round_index=r + 1, seed=0,
                              device=device).seconds for r in range(args.repeat)]
        evals = [evaluate_arrays(site, protocol, weights, device=device).seconds
                 for _ in range(args.repeat)]
        name = torch.cuda.get_device_name() if device.type == "cuda" else (
            f"cpu, {args.workers} threads")
        print(f"{name}: {statistics.median(epochs):.2f} s per local epoch "
              f"({n_train} crops), {statistics.median(evals):.2f} s per evaluation "
              f"({len(crops.splits)} crops)")


if __name__ == "__main__":
    main()
