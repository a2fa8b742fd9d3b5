"""The fleet gateway keeps the coordinator's control interface off the sites' network: from a
site's side no run can be started, no node registered, nothing listed; the sites themselves
join and are served through it."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from common.security import make_server_credentials, make_site_key
from server.commands import flower_env, write_connection
from server.federation import LocalFederation
from server.gateway import fleet_paths
from server.processes import MARKER_ENV, FlowerProcess, free_ports, processes_marked, stop_processes
from tests.server.studies import process_tree

APP_DIR = Path(__file__).resolve().parents[2]
MYELOFED = Path(sys.executable).parent / "myelofed"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("flower-superlink") is None, reason="flower-superlink is not installed")]


def test_the_gateway_forwards_exactly_what_a_supernode_calls():
    """Every path Flower's SuperNode client posts to is a Fleet API route the gateway forwards,
    and no Control or runtime route is."""
    import inspect
    import re

    from flwr.supernode import fleet_http_client

    called = set(re.findall(r'path="(/v1/[a-z/-]+)"', inspect.getsource(fleet_http_client)))
    assert called and called <= fleet_paths()
    assert all(p.startswith("/v1/fleet/") for p in fleet_paths())


def test_from_a_sites_side_no_run_starts_and_no_node_registers(tmp_path: Path):
    site = tmp_path / "site_A.toml"  # never read: no run reaches the site
    site.write_text('site_name = "site_A"\nmanifest = "m.csv"\n')
    with LocalFederation(APP_DIR, {"site_A": site}, tmp_path / "federation") as federation:
        # site_A's SuperNode joined through the gateway (the fixture waits for its node id)
        assert federation.fleet_address != federation.address
        gateway_url = f"https://{federation.fleet_address}"
        tls = ssl.create_default_context(cafile=str(federation.ca_cert))

        # Flower's own CLI pointed at the sites' port, as someone on a site's network would
        home = tmp_path / "site-home"
        write_connection(home, "coordinator", federation.fleet_address,
                         root_certificates=federation.ca_cert)
        env = flower_env(home)
        key = make_site_key(tmp_path / "intruder", "intruder")
        tries = {
            "register": ["flwr", "supernode", "register", str(key.public), "coordinator",
                         "--name", "intruder"],
            "run": ["flwr", "run", str(APP_DIR), "coordinator"],
            "ls": ["flwr", "ls", "coordinator", "--format", "json"],
            "nodes": ["flwr", "supernode", "list", "coordinator", "--format", "json"],
        }
        answers = {name: subprocess.run(command, env=env, capture_output=True, text=True,
                                        timeout=120, cwd=tmp_path)
                   for name, command in tries.items()}

        # the same requests straight at the gateway, and ways around its path check
        with httpx.Client(base_url=gateway_url, verify=tls, timeout=30) as client:
            direct = {path: client.post(path, content=b"").status_code for path in (
                "/v1/control/start-run", "/v1/control/register-node", "/v1/control/list-runs",
                "/v1/runtime/get-nodes", "/v1/runtime/push-messages",
                "/v1/fleet/../control/start-run", "/v1/fleet/%2e%2e/control/start-run",
                "/v1/fleet/pull%2Dmessages", "//v1/control/start-run")}
            direct["GET /docs"] = client.get("/docs").status_code
            direct["GET /openapi.json"] = client.get("/openapi.json").status_code
            health = client.get("/health").status_code
            # a Fleet route is forwarded: the SuperLink itself answers (an empty request is
            # not a valid signed one, so it refuses it, but not with the gateway's 403 text)
            fleet = client.post("/v1/fleet/get-run", content=b"",
                                headers={"content-type": "application/protobuf"})

        # what the coordinator sees on its own (loopback) port
        coordinator = federation.env("superlink")
        runs = subprocess.run(["flwr", "ls", federation.connection, "--format", "json"],
                              env=coordinator, capture_output=True, text=True, timeout=120)
        nodes = subprocess.run(["flwr", "supernode", "list", federation.connection, "--format",
                                "json"], env=coordinator, capture_output=True, text=True,
                               timeout=120)
        gateway_log = next(p for p in federation.processes if p.name == "gateway").tail(200)

    for name, done in answers.items():
        output = done.stdout + done.stderr
        assert "Successfully started run" not in output, (name, output)
        assert done.returncode != 0 or '"success": false' in output, (name, output[-2000:])
        assert "403 Forbidden" in output, (name, output[-2000:])
    assert set(direct.values()) == {403}, direct
    assert health == 200
    assert fleet.status_code != 403 or "MyeloFed gateway" not in fleet.text
    assert "refused POST /v1/control/start-run" in gateway_log
    assert "refused POST /v1/control/register-node" in gateway_log

    assert runs.returncode == 0, runs.stdout + runs.stderr
    assert json.loads(runs.stdout).get("runs", []) == []  # no run was started
    assert nodes.returncode == 0, nodes.stdout + nodes.stderr
    assert len(json.loads(nodes.stdout)["nodes"]) == 1  # site_A's only: no intruder
    assert processes_marked(federation.marker) == []


@pytest.mark.skipif(not MYELOFED.exists(), reason="the myelofed command is not installed")
def test_server_start_binds_the_superlink_to_loopback_and_the_gateway_outside(tmp_path: Path):
    make_server_credentials(tmp_path / "coordinator", ["localhost", "127.0.0.1"])
    port, control_port = free_ports(2)
    marker = uuid.uuid4().hex
    env = {**flower_env(tmp_path / "home"), MARKER_ENV: marker}
    server = FlowerProcess.start("server", [
        str(MYELOFED), "server", "start", "--secrets", str(tmp_path / "coordinator"),
        "--state", str(tmp_path / "state"), "--host", "0.0.0.0", "--port", str(port),
        "--control-port", str(control_port)], tmp_path / "server.log", env)
    try:
        server.wait_ready(60, port=("127.0.0.1", port))
        server.wait_ready(60, port=("127.0.0.1", control_port))
        listening = {}
        for proc, cmdline in process_tree(server.popen.pid):
            try:
                for conn in proc.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN:
                        listening[conn.laddr.port] = (conn.laddr.ip, cmdline)
            except psutil.NoSuchProcess:
                continue  # ended since process_tree read it
    finally:
        stop_processes([server], marker, grace_s=5)
    assert listening[control_port][0] == "127.0.0.1", listening
    assert "--enable-supernode-auth" in listening[control_port][1]
    assert "--ssl-certfile" in listening[control_port][1]
    assert listening[port][0] == "0.0.0.0" and "gateway" not in listening[control_port][1]
    assert processes_marked(marker) == []
    # on SIGTERM the command stopped its SuperLink too, and said nothing went wrong
    assert "Traceback" not in server.tail(500)
