"""A deployment run as a hospital IT department and a coordinator would, with the commands only,
through what real networks and sites do to it. TLS, node authentication and the gateway; three
sites; the study app released as one bundle. site_C's SuperNode is killed just after it took
CNN round 2's message (a crash or a pulled cable) and restarted as its service manager would;
the coordinator is stopped with SIGTERM after round 2, started again on the same ports, and the
study resumes to its end. Then the multicentre report and every site's report exist, every
exclusion names a site, and no process is left."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from cli.coordinator import CONNECTION
from client.report import report_dir
from common.bundle import build_release, unpack
from common.messages import MessageType
from common.security import make_server_credentials, make_site_key
from common.site_config import load_site_config
from server.commands import flower_env, flwr_run_command
from server.federation import RUN_STARTED
from server.processes import (
    MARKER_ENV,
    SUPERNODE_CONNECTED,
    FederationError,
    FlowerProcess,
    free_ports,
    kill_now,
    processes_marked,
    stop_processes,
)
from tests.server.studies import (
    ROUND_TIMEOUT_S,
    SITES,
    image_only_study,
    received,
    wait_for,
)

MYELOFED = Path(sys.executable).parent / "myelofed"

pytestmark = [pytest.mark.slow, pytest.mark.exclusive, pytest.mark.skipif(
    shutil.which("flower-superlink") is None or not MYELOFED.exists(),
    reason="flower-superlink or the myelofed command is not installed")]

APP_DIR = Path(__file__).resolve().parents[2]


def test_a_killed_site_and_a_stopped_coordinator_are_survived_and_reported(tmp_path: Path):
    configs, settings, protocol_file = image_only_study(tmp_path, rounds=3)
    secrets, state = tmp_path / "coordinator", tmp_path / "state"
    make_server_credentials(secrets, ["localhost", "127.0.0.1"])
    fab, digest = build_release(APP_DIR, tmp_path / "release")
    app = tmp_path / "app"
    assert unpack(fab, app) == digest
    port, control_port, *node_ports = free_ports(2 + len(SITES))
    marker = uuid.uuid4().hex
    env = {**flower_env(tmp_path / "home"), MARKER_ENV: marker}
    coordinator_env = {**flower_env(state / "flwr-home"), MARKER_ENV: marker}
    start = [str(MYELOFED), "server", "start", "--secrets", str(secrets), "--state", str(state),
             "--host", "127.0.0.1", "--port", str(port), "--control-port", str(control_port)]
    run_config = settings.to_run_config(str(protocol_file))
    processes: list[FlowerProcess] = []

    def start_coordinator(attempt: int) -> FlowerProcess:
        server = FlowerProcess.start(f"server-{attempt}", start,
                                     tmp_path / "logs" / f"server-{attempt}.log", env)
        processes.append(server)
        server.wait_ready(60, port=("127.0.0.1", port))
        server.wait_ready(60, port=("127.0.0.1", control_port))
        return server

    def flwr_run(attempt: int) -> FlowerProcess:
        run = FlowerProcess.start(f"flwr-run-{attempt}", flwr_run_command(app, CONNECTION,
                                                                          run_config),
                                  tmp_path / "logs" / f"flwr-run-{attempt}.log", coordinator_env)
        processes.append(run)
        return run

    def report() -> str:
        return "\n".join(p.describe(60) for p in processes)

    joins: dict[str, list[str]] = {}

    def join(site: str, attempt: int = 0) -> FlowerProcess:
        node = FlowerProcess.start(f"{site}-{attempt}", joins[site],
                                   tmp_path / "logs" / f"{site}-{attempt}.log", env)
        processes.append(node)
        return node

    def latest(site: str) -> FlowerProcess:
        return next(p for p in reversed(processes) if p.name.startswith(f"{site}-"))

    def restart(site: str) -> FlowerProcess:
        """As systemd's Restart=always: the SuperLink refuses the same node until it has seen
        its heartbeats stop (about a minute); a refused start is tried again every 5 s."""
        for attempt in range(1, 60):
            node = join(site, attempt)
            try:
                node.wait_ready(120, log_pattern=SUPERNODE_CONNECTED)
                return node
            except FederationError:
                if node.popen.poll() is None:
                    raise
                time.sleep(5)
        raise AssertionError(f"{site} was not taken back\n{report()}")

    try:
        server = start_coordinator(1)
        for site, node_port in zip(SITES, node_ports, strict=True):
            key = make_site_key(tmp_path / "keys", site)
            registered = subprocess.run(
                [str(MYELOFED), "server", "register", str(key.public), "--site", site,
                 "--state", str(state)], env=env, capture_output=True, text=True, timeout=60)
            assert registered.returncode == 0, registered.stdout + registered.stderr
            with configs[site].open("a") as fh:  # each site approves the released bundle
                fh.write(f'approved_apps = ["{digest}"]\n')
            assert load_site_config(configs[site]).approved_apps == (digest,)
            joins[site] = [
                str(MYELOFED), "site", "join", "--superlink", f"127.0.0.1:{port}",
                "--site-config", str(configs[site]), "--ca", str(secrets / "ca.crt"),
                "--key", str(key.private), "--port", str(node_port)]
            join(site).wait_ready(120, log_pattern=SUPERNODE_CONNECTED)

        first = flwr_run(1)
        wait_for(lambda: received(latest("site_C").log_path, "train") >= 2, 900,
                 "site_C taking round 2's message", report)
        kill_now(latest("site_C"))
        restart("site_C")
        wait_for(lambda: "CNN round 2/3" in first.tail(10_000), 600, "CNN round 2", report)
        # systemctl stop: SIGTERM to 'myelofed server start' alone
        started = psutil.Process(server.popen.pid).children(recursive=True)
        server.popen.send_signal(signal.SIGTERM)
        server.popen.wait(timeout=90)
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, f"coordinator processes left after SIGTERM: {alive}\n{report()}"
        first.popen.wait(timeout=120)  # flwr run --stream ends with its SuperLink
        assert json.loads((settings.out_dir / "checkpoint.json").read_text())["cnn_round"] >= 2

        start_coordinator(2)  # the same ports: nothing of the first one holds them
        for site in SITES:  # the sites' SuperNodes reconnect by themselves
            wait_for(lambda s=site: "Connection successful after" in latest(s).tail(100_000),
                     300, f"{site} reconnected", report)
        second = flwr_run(2)
        second.popen.wait(timeout=900)
        output = second.tail(10_000)
        assert "resuming the study" in output, report()
        run_id = RUN_STARTED.search(output)
        assert run_id, output
        # after the restart each site was asked the handshake again, round 3 and the
        # evaluation, and not the preparation
        for site in SITES:
            assert [received(latest(site).log_path, kind, run_id.group(1))
                    for kind in (MessageType.HANDSHAKE, MessageType.PREPARE, MessageType.TRAIN,
                                 MessageType.EVALUATE)] == [1, 0, 1, 1], (site, report())
    finally:
        stop_processes(reversed(processes), marker, grace_s=10)
    assert processes_marked(marker) == [], report()

    status = json.loads((settings.out_dir / "study.json").read_text())
    assert status == {"status": "done", "until": "cnn", "reason": ""}, report()
    html = settings.out_dir / "report.html"
    assert html.is_file() and html.stat().st_mode & 0o077 == 0
    for site in SITES:
        site_html = report_dir(load_site_config(configs[site]), settings.protocol) / \
            "site_report.html"
        assert site_html.is_file(), f"{site}: no site report\n{report()}"
    # every exclusion and left-out round names a registered site, never a node number
    handshake = json.loads((settings.out_dir / "handshake.json").read_text())
    cnn = json.loads((settings.out_dir / "cnn.json").read_text())
    named = [*handshake["excluded"], *cnn["failed"], *(e["site"] for e in cnn["left_out"])]
    assert named and all(name in SITES for name in named), named
    assert not re.search(r"\bnode \d+", json.dumps([handshake["excluded"], cnn["left_out"]]))
    # round 2 went on without the killed site, which was back for the last round
    assert set(cnn["history"]["1"]) == set(SITES)
    assert set(cnn["history"]["2"]) == {"site_A", "site_B"}
    assert set(cnn["history"]["3"]) == set(SITES) == set(cnn["final"])
    (drop,) = cnn["left_out"]  # recorded once: while it was gone, it was not asked
    assert drop["round"] == 2 and drop["site"] == "site_C" and drop["kind"] == "dropped"
    assert cnn["failed"] == {}
    # the dead site cost its round at most the round's timeout, not the study
    assert cnn["round_seconds"]["2"] < ROUND_TIMEOUT_S + 30, cnn["round_seconds"]
    text = html.read_text()
    assert "Rounds a site was left out of" in text and drop["reason"] in text
    assert json.loads((settings.out_dir / "checkpoint.json").read_text())["done"] == [
        "prepare", "cnn"]
    assert not (settings.out_dir / "combat.json").exists()  # an image-only study
