"""Scale: round time and memory against the number of sites, with real processes on loopback.

For each number of sites (default 2, 5, 10, 20, 50) it starts a federation as a real coordinator
runs it (``server/federation.py``'s LocalFederation: a SuperLink with TLS and SuperNode
authentication, the fleet gateway, one SuperNode per site behind its app allow-list) and runs
a study's first two phases (handshake and local preparation) with every site required. Every
site reads the same small cohort (14 patients) and starts from the same extraction cache, so
the sites' own work is small and equal, and what grows with the number of sites is the
federation's: the coordinator's messages, the SuperNodes' polling and a ClientApp process per
message. It prints, per size: the time to start and register the federation, each round's wall
time (from sending its messages to the last reply, measured by the ServerApp), its ratio to the
2-site round (the baseline), and the peak resident memory of the SuperLink (with its ServerApp),
of the gateway, and of one SuperNode (mean), sampled every 0.2 s.

The sites run at a lower scheduling priority (``--site-nice``, 10), as if each had a machine
of its own: on one machine with few cores, 20 sites starting their ClientApps at once starve the
SuperLink, whose SQLite state then gives up on writes after 5 s (measured: at 20 sites with the
same priority, one site's reply was lost to "database is locked").

    python bench/scale.py [--sites 2 5 10 20 50] [--site-nice 10] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from client.phases.prepare import prepare  # noqa: E402
from client.workspace import resolve_site  # noqa: E402
from common.protocol import load_protocol  # noqa: E402
from common.synthetic import CohortSpec, make_sites, write_cohort  # noqa: E402
from server.federation import LocalFederation  # noqa: E402
from server.study import StudySettings  # noqa: E402


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class Peaks(threading.Thread):
    """Samples the federation's processes' memory until stopped; keeps the peaks."""

    def __init__(self, federation: LocalFederation) -> None:
        super().__init__(daemon=True)
        self.federation, self.stop = federation, threading.Event()
        self.superlink = self.gateway = self.supernodes = 0

    def run(self) -> None:
        while not self.stop.wait(0.2):
            by_name = {p.name: p.popen.pid for p in self.federation.processes
                       if p.popen.poll() is None}
            self.superlink = max(self.superlink, tree_rss(by_name.get("superlink", 0)))
            self.gateway = max(self.gateway, tree_rss(by_name.get("gateway", 0)))
            nodes = [tree_rss(pid) for name, pid in by_name.items()
                     if name.startswith("supernode-")]
            if nodes:
                self.supernodes = max(self.supernodes, sum(nodes) // len(nodes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 5, 10, 20, 50])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--site-nice", type=int, default=10,
                        help="scheduling priority of the sites' processes (0: the same as the "
                        "coordinator's; they share this machine's cores)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="myelofed-scale-"))
    cohort = work / "cohort"
    if not (cohort / "study.yaml").exists():
        write_cohort(cohort, CohortSpec(make_sites((14,), True)), workers=2)
    protocol = load_protocol(cohort / "study.yaml")
    template = resolve_site({"partition-id": 0}, {"simulation-cohort": str(cohort)})
    prepare(template, protocol, seed=0, test_fraction=0.3)  # the shared extraction cache

    rows = []
    for n in args.sites:
        folder = work / f"sites-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        configs = {}
        for k in range(n):
            name = f"site_{k:02d}"
            shutil.copytree(template.cache_dir, folder / "work" / name / "cache")
            configs[name] = folder / "configs" / f"{name}.toml"
            configs[name].parent.mkdir(parents=True, exist_ok=True)
            configs[name].write_text(
                f'site_name = "{name}"\nmanifest = {json.dumps(str(template.manifest))}\n'
                f'work_dir = {json.dumps(str(folder / "work" / name))}\nworkers = 1\n')
        settings = StudySettings(protocol, folder / "out", min_sites=n, min_cases_per_site=10,
                                 timeout_s=600, seed=0, until="prepare")
        started = time.monotonic()
        with LocalFederation(ROOT, configs, folder / "federation", ready_timeout_s=600,
                             site_nice=args.site_nice) as federation:
            start_s = time.monotonic() - started
            peaks = Peaks(federation)
            peaks.start()
            result = federation.run(settings.to_run_config(str(cohort / "study.yaml")),
                                    timeout_s=1800)
            peaks.stop.set()
            peaks.join()
        if not result.ok:
            print(f"{n} sites: {result.summary()}\n{federation.report(20)}")
            break
        rounds = [json.loads((settings.out_dir / f"{phase}.json").read_text())["round_seconds"]
                  for phase in ("handshake", "prepare")]
        rows.append((n, start_s, *rounds, result.wall_s, peaks.superlink, peaks.gateway,
                     peaks.supernodes))
        print(f"{n} sites done: start {start_s:.1f} s, rounds {rounds[0]:.1f} s and "
              f"{rounds[1]:.1f} s", flush=True)

    mib = 1 << 20
    base = rows[0][2:4] if rows else (1.0, 1.0)
    print(f"\n{'sites':>5} {'start s':>8} {'handshake s':>12} {'x base':>7} {'prepare s':>10} "
          f"{'x base':>7} {'flwr run s':>11} {'SuperLink MiB':>14} {'gateway MiB':>12} "
          f"{'SuperNode MiB':>14}")
    for n, start_s, hs, ps, wall, link, gateway, node in rows:
        print(f"{n:5d} {start_s:8.1f} {hs:12.1f} {hs / base[0]:7.2f} {ps:10.1f} "
              f"{ps / base[1]:7.2f} {wall:11.1f} {link / mib:14.0f} {gateway / mib:12.0f} "
              f"{node / mib:14.0f}")
    print(f"\nbaseline: the {rows[0][0] if rows else '?'}-site rounds; a SuperNode's memory is "
          "its process with the ClientApp it runs at the time (mean over sites)")


if __name__ == "__main__":
    main()
