"""``myelofed server start``, ``myelofed server register`` and ``myelofed site join``: the
commands a coordinator and a hospital run, as real processes on loopback, secure by default."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from common.security import make_server_credentials, make_site_key
from server.launch import (
    MARKER_ENV,
    SUPERNODE_CONNECTED,
    FlowerProcess,
    flower_env,
    free_ports,
    processes_marked,
    stop_processes,
)

MYELOFED = Path(sys.executable).parent / "myelofed"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("flower-superlink") is None or not MYELOFED.exists(),
    reason="flower-superlink or the myelofed command is not installed")]


def test_a_coordinator_and_a_site_started_by_the_commands_meet_over_tls(tmp_path: Path):
    make_server_credentials(tmp_path / "coordinator", ["localhost", "127.0.0.1"])
    key = make_site_key(tmp_path / "site", "site_A")
    (tmp_path / "site.toml").write_text('site_name = "site_A"\nmanifest = "cases.csv"\n')
    port, node_port = free_ports(2)
    marker = uuid.uuid4().hex
    env = {**flower_env(tmp_path / "home"), MARKER_ENV: marker}
    processes = []
    try:
        server = FlowerProcess.start("server", [
            str(MYELOFED), "server", "start", "--secrets", str(tmp_path / "coordinator"),
            "--state", str(tmp_path / "state"), "--host", "127.0.0.1", "--port", str(port)],
            tmp_path / "server.log", env)
        processes.append(server)
        server.wait_ready(60, port=("127.0.0.1", port))
        became = psutil.Process(server.popen.pid).cmdline()  # the command exec'd Flower
        assert "--enable-supernode-auth" in became and "--ssl-certfile" in became
        assert "--insecure" not in became
        registered = subprocess.run([str(MYELOFED), "server", "register", str(key.public),
                                     "--site", "site_A", "--state", str(tmp_path / "state")],
                                    env=env, capture_output=True, text=True, timeout=60)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        site = FlowerProcess.start("site", [
            str(MYELOFED), "site", "join", "--superlink", f"127.0.0.1:{port}",
            "--site-config", str(tmp_path / "site.toml"), "--ca",
            str(tmp_path / "coordinator" / "ca.crt"), "--key", str(key.private),
            "--port", str(node_port)], tmp_path / "site.log", env)
        processes.append(site)
        site.wait_ready(60, log_pattern=SUPERNODE_CONNECTED)  # accepted by the SuperLink
    finally:
        stop_processes(processes, marker, grace_s=5)
    assert processes_marked(marker) == []

    # a site without its credentials is told what is missing, before anything starts
    missing = subprocess.run([str(MYELOFED), "site", "join", "--superlink", "127.0.0.1:1",
                              "--site-config", str(tmp_path / "site.toml")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--ca and --key are needed" in missing.stdout + \
        missing.stderr
