"""Federated rounds: wall time per CNN round in both engines, and bytes a site sends per round.

Runs one small study (three sites of 30-38 patients, the CNN phase with the protocol's default
network) twice: in Flower's simulation engine, and with real processes on loopback (a
``flower-superlink``, one ``flower-supernode`` per site, ``flwr run``; ``server/federation.py``).
For each CNN round it prints the wall time (from sending the round's messages to aggregating
the replies), the local compute (the slowest site's evaluation of the model it received plus its
training) and the difference, the federation overhead. Then the bytes of the weights a site
sends each round, as Flower serializes them, against their raw float32 size (goal <= 1.05x).

    python bench/rounds.py [--rounds 3] [--no-deployment] [--work DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from flwr.app import Array, ArrayRecord  # noqa: E402

from cli.simulation import run_in_simulation  # noqa: E402
from common.network import build_network, float32_nbytes, state_arrays  # noqa: E402
from common.protocol import CnnSpec, ModelSpec, load_protocol  # noqa: E402
from common.synthetic import CohortSpec, make_sites, read_cohort_spec, write_cohort  # noqa: E402
from harmonization.combat.design import CombatOptions  # noqa: E402
from server.federation import LocalFederation  # noqa: E402
from server.study import StudySettings  # noqa: E402

SITES = ("site_A", "site_B", "site_C")


def per_round(report: dict) -> list[tuple[int, float, float]]:
    """(round, wall seconds, slowest site's local compute seconds) per CNN round."""
    out = []
    for r, sites in sorted(report["history"].items(), key=lambda kv: int(kv[0])):
        compute = max((m.get("train_seconds") or 0) + (m.get("global_seconds") or 0)
                      for m in sites.values())
        out.append((int(r), report["round_seconds"][r], compute))
    return out


def show(engine: str, report: dict) -> None:
    print(f"\n{engine}: {report['architecture']} x {report['rounds']} rounds of "
          f"{report['aggregator']}")
    print(f"  {'round':>5} {'wall s':>8} {'compute s':>10} {'overhead s':>11}")
    for r, wall, compute in per_round(report):
        print(f"  {r:5d} {wall:8.2f} {compute:10.2f} {wall - compute:11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-deployment", action="store_true",
                        help="the simulation engine only")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="myelofed-bench-rounds-"))
    cohort = work / "cohort"
    if read_cohort_spec(cohort) is None:
        write_cohort(cohort, CohortSpec(make_sites((30, 34, 38), True)), workers=2)
    protocol = load_protocol(cohort / "study.yaml").model_copy(update={
        "model": ModelSpec(screening_top_k=10, cv_folds=3, n_lambdas=3),
        "cnn": CnnSpec(rounds=args.rounds)})
    protocol_file = work / "protocol.yaml"
    protocol_file.write_text(yaml.safe_dump(protocol.model_dump(mode="json"), sort_keys=False))
    protocol = load_protocol(protocol_file)
    settings = StudySettings(protocol, work / "simulation", min_sites=2, timeout_s=300, seed=0,
                             combat=CombatOptions(min_batch_size=3, min_cell=1))

    # what a site sends each round: the weights as Flower serializes them, against raw float32
    weights = state_arrays(build_network(protocol.cnn, protocol.task.kind))
    sent = sum(len(a.data) for a in ArrayRecord({k: Array(v) for k, v in weights.items()})
               .values())
    raw = float32_nbytes(weights)
    print(f"weights: {len(weights)} tensors; raw float32 {raw / 2**20:.2f} MiB; sent per site "
          f"per round {sent / 2**20:.2f} MiB ({sent / raw:.3f}x, goal <= 1.05x); the server "
          f"sends each site the same once a round")

    start = time.perf_counter()
    run_in_simulation(cohort, settings, lambda _: None)
    print(f"\nsimulation engine: whole study {time.perf_counter() - start:.0f} s")
    show("simulation engine", json.loads((settings.out_dir / "cnn.json").read_text()))

    if args.no_deployment:
        return
    deployed = dataclasses.replace(settings, out_dir=work / "deployment" / "out")
    site_configs = {}
    for site in SITES:  # each site its own work folder; the extraction cache is reused
        site_work = work / "deployment" / "work" / site
        if not (site_work / "cache").exists():
            shutil.copytree(cohort / "work" / site / "cache", site_work / "cache")
        config = work / "deployment" / "sites" / f"{site}.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f'site_name = "{site}"\nmanifest = "{cohort / site / "manifest.csv"}"\n'
                          f'work_dir = "{site_work}"\n')
        site_configs[site] = config
    with LocalFederation(ROOT, site_configs, work / "deployment" / "federation") as federation:
        result = federation.run(deployed.to_run_config(str(protocol_file)), timeout_s=1800)
    print(f"\ndeployment (real processes): whole study {result.wall_s:.0f} s, "
          f"{result.summary()}")
    if not result.ok:
        print(federation.report(lines=30))
        sys.exit(1)
    show("deployment", json.loads((deployed.out_dir / "cnn.json").read_text()))
    print(f"\ncohort and outputs: {work}")


if __name__ == "__main__":
    main()
