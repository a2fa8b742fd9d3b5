"""``myelofed server start``, ``myelofed server register`` and ``myelofed site join``: the
commands a coordinator and a hospital run, as real processes on loopback, secure by default."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from common.security import make_server_credentials, make_site_key
from server.commands import flower_env
from server.processes import (
    MARKER_ENV,
    SUPERNODE_CONNECTED,
    FlowerProcess,
    free_ports,
    processes_marked,
    stop_processes,
)
from tests.server.studies import process_tree

MYELOFED = Path(sys.executable).parent / "myelofed"
APP_DIR = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("flower-superlink") is None or not MYELOFED.exists(),
    reason="flower-superlink or the myelofed command is not installed")]


def test_a_coordinator_and_a_site_started_by_the_commands_meet_over_tls(tmp_path: Path):
    make_server_credentials(tmp_path / "coordinator", ["localhost", "127.0.0.1"])
    key = make_site_key(tmp_path / "site", "site_A")
    hashed = subprocess.run([str(MYELOFED), "app-hash", str(APP_DIR)], capture_output=True,
                            text=True, timeout=120)
    digest = hashed.stdout.strip()
    assert hashed.returncode == 0 and re.fullmatch(r"[0-9a-f]{64}", digest), hashed.stderr
    (tmp_path / "unapproved.toml").write_text('site_name = "site_A"\nmanifest = "cases.csv"\n')
    (tmp_path / "site.toml").write_text('site_name = "site_A"\nmanifest = "cases.csv"\n'
                                        f'approved_apps = ["{digest}"]\n')
    port, control_port, node_port = free_ports(3)
    marker = uuid.uuid4().hex
    env = {**flower_env(tmp_path / "home"), MARKER_ENV: marker}
    processes = []
    try:
        server = FlowerProcess.start("server", [
            str(MYELOFED), "server", "start", "--secrets", str(tmp_path / "coordinator"),
            "--state", str(tmp_path / "state"), "--host", "127.0.0.1", "--port", str(port),
            "--control-port", str(control_port)], tmp_path / "server.log", env)
        processes.append(server)
        server.wait_ready(60, port=("127.0.0.1", port))
        superlink = [cmdline for _, cmdline in process_tree(server.popen.pid)
                     if "flower-superlink" in cmdline]
        assert len(superlink) == 1 and "--enable-supernode-auth" in superlink[0]
        assert "--ssl-certfile" in superlink[0] and "--insecure" not in superlink[0]
        registered = subprocess.run([str(MYELOFED), "server", "register", str(key.public),
                                     "--site", "site_A", "--state", str(tmp_path / "state")],
                                    env=env, capture_output=True, text=True, timeout=60)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        node_id = re.search(r"registered site_A: node (\d+)", registered.stdout)
        assert node_id, registered.stdout
        again = subprocess.run([str(MYELOFED), "server", "register", str(key.public),
                                "--site", "site_A", "--state", str(tmp_path / "state")],
                               env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 2 and "a site of this name is registered" in again.stderr
        site = FlowerProcess.start("site", [
            str(MYELOFED), "site", "join", "--superlink", f"127.0.0.1:{port}",
            "--site-config", str(tmp_path / "site.toml"), "--ca",
            str(tmp_path / "coordinator" / "ca.crt"), "--key", str(key.private),
            "--port", str(node_port)], tmp_path / "site.log", env)
        processes.append(site)
        site.wait_ready(60, log_pattern=SUPERNODE_CONNECTED)  # accepted by the SuperLink
        guarded = " ".join(psutil.Process(site.popen.pid).cmdline())
        assert "-m client.supernode --site site_A --approve " + digest in guarded

        def sites(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(MYELOFED), "server", "sites", "--state",
                                   str(tmp_path / "state"), *extra], env=env,
                                  capture_output=True, text=True, timeout=60)

        listed = sites()
        assert listed.returncode == 0, listed.stdout + listed.stderr
        row = next(line for line in listed.stdout.splitlines() if "site_A" in line)
        assert node_id.group(1) in row and "online" in row, listed.stdout
        # unregistering by name stops the site's SuperNode (Flower refuses its key)
        removed = sites("--unregister", "site_A")
        assert removed.returncode == 0 and "unregistered site_A" in removed.stdout, \
            removed.stdout + removed.stderr
        site.popen.wait(timeout=120)  # Flower ends a node whose key was unregistered
        assert "site_A" not in sites().stdout
    finally:
        stop_processes(processes, marker, grace_s=5)
    assert processes_marked(marker) == []

    # a site without its credentials is told what is missing, before anything starts
    missing = subprocess.run([str(MYELOFED), "site", "join", "--superlink", "127.0.0.1:1",
                              "--site-config", str(tmp_path / "site.toml")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--ca and --key are needed" in missing.stdout + \
        missing.stderr
    # nor does a site that approved no app
    unapproved = subprocess.run([str(MYELOFED), "site", "join", "--superlink", "127.0.0.1:1",
                                 "--site-config", str(tmp_path / "unapproved.toml"), "--insecure"],
                                capture_output=True, text=True, timeout=60)
    assert unapproved.returncode == 2
    assert "approved_apps: empty" in unapproved.stdout + unapproved.stderr


def test_a_coordinator_stopped_by_sigterm_leaves_nothing_and_starts_again_on_its_ports(
        tmp_path: Path):
    """SIGTERM to 'myelofed server start' (systemd's stop) stops the gateway, the SuperLink and
    all the SuperLink started; a second start on the same ports then works (it used to fail
    with 'address already in use': the SuperLink outlived the command)."""
    import signal

    make_server_credentials(tmp_path / "coordinator", ["localhost", "127.0.0.1"])
    port, control_port = free_ports(2)
    marker = uuid.uuid4().hex
    env = {**flower_env(tmp_path / "home"), MARKER_ENV: marker}
    command = [str(MYELOFED), "server", "start", "--secrets", str(tmp_path / "coordinator"),
               "--state", str(tmp_path / "state"), "--host", "127.0.0.1", "--port", str(port),
               "--control-port", str(control_port)]
    try:
        for attempt in (1, 2):
            server = FlowerProcess.start("server", command, tmp_path / f"server{attempt}.log",
                                         env)
            server.wait_ready(60, port=("127.0.0.1", port))
            server.wait_ready(60, port=("127.0.0.1", control_port))
            tree = process_tree(server.popen.pid)[1:]
            started = [proc for proc, _ in tree]
            assert any("flower-superlink" in cmdline for _, cmdline in tree)
            server.popen.send_signal(signal.SIGTERM)
            assert server.popen.wait(timeout=60) in (0, 128 + signal.SIGTERM), server.tail()
            assert "Traceback" not in server.tail(500), server.tail(500)
            _, alive = psutil.wait_procs(started, timeout=30)
            assert not alive, f"left running after SIGTERM: {alive}\n{server.tail()}"
            assert processes_marked(marker) == [], server.tail()
    finally:
        stop_processes([], marker, grace_s=5)
