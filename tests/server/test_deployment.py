"""Issue 21's acceptance: a deployment run as a hospital IT department and a coordinator would,
with the commands only. TLS, node authentication and the gateway; three sites; the study app
released as one bundle; the coordinator stopped with SIGTERM in the middle of the CNN, started
again on the same ports, and the study resumed to its end. Then the multicentre report and
every site's report exist, every exclusion names a site, and no process is left."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from cli.coordinator import CONNECTION
from client.report import report_dir
from common.bundle import build_release, unpack
from common.security import make_server_credentials, make_site_key
from common.site_config import load_site_config
from server.commands import flower_env, flwr_run_command
from server.processes import (
    MARKER_ENV,
    SUPERNODE_CONNECTED,
    FlowerProcess,
    free_ports,
    processes_marked,
    stop_processes,
)
from tests.server.test_reliability import SITES, image_only_study, wait_for

MYELOFED = Path(sys.executable).parent / "myelofed"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("flower-superlink") is None or not MYELOFED.exists(),
    reason="flower-superlink or the myelofed command is not installed")]

APP_DIR = Path(__file__).resolve().parents[2]


def test_a_deployment_stopped_mid_cnn_resumes_and_reports(tmp_path: Path):
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
            node = FlowerProcess.start(site, [
                str(MYELOFED), "site", "join", "--superlink", f"127.0.0.1:{port}",
                "--site-config", str(configs[site]), "--ca", str(secrets / "ca.crt"),
                "--key", str(key.private), "--port", str(node_port)],
                tmp_path / "logs" / f"{site}.log", env)
            processes.append(node)
            node.wait_ready(120, log_pattern=SUPERNODE_CONNECTED)

        first = flwr_run(1)
        wait_for(lambda: "CNN round 2/3" in first.tail(10_000), 900, "CNN round 2", report)
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
            wait_for(lambda s=site: "Connection successful after" in next(
                p for p in processes if p.name == s).tail(100_000), 300,
                f"{site} reconnected", report)
        second = flwr_run(2)
        second.popen.wait(timeout=900)
        output = second.tail(10_000)
        assert "resuming the study" in output, report()
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
    assert all(name in SITES for name in named), named
    assert not re.search(r"\bnode \d+", json.dumps([handshake["excluded"], cnn["left_out"]]))
    assert set(cnn["final"]) == set(SITES)
