"""The harness that starts Flower's processes: command lines, config files, environment, and
that it stops everything it started and says why a process did not get ready."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from server.commands import (
    INSECURE,
    ServerTls,
    flower_env,
    flwr_run_command,
    format_config,
    superlink_command,
    supernode_command,
    write_connection,
)
from server.federation import LocalFederation
from server.processes import (
    MARKER_ENV,
    SUPERNODE_CONNECTED,
    FederationError,
    FlowerProcess,
    free_ports,
    processes_marked,
    stop_processes,
)

APP_DIR = Path(__file__).resolve().parents[2]


def test_config_text_quotes_strings_and_refuses_what_flower_would_cut():
    text = format_config({"site-name": "site A", "site-config": "/a b/c.toml", "seed": 3,
                          "timeout-s": 120.0, "strict": True})
    assert text == ('site-name="site A" site-config="/a b/c.toml" seed=3 timeout-s=120.0 '
                    "strict=true")
    for bad in ('say "hi"', "it's", "two\nlines"):
        with pytest.raises(ValueError, match="quote or a line break"):
            format_config({"k": bad})
    with pytest.raises(ValueError, match="finite"):
        format_config({"k": float("nan")})
    with pytest.raises(ValueError, match="config key"):
        format_config({"a key": 1})


def test_insecure_command_lines_say_so_and_tls_ones_carry_the_files(tmp_path: Path):
    link = superlink_command(port=9200, tls=INSECURE)
    assert link[:5] == ["flower-superlink", "--host", "127.0.0.1", "--port", "9200"]
    assert "--insecure" in link and "--disable-runtime-dependency-installation" in link
    tls = ServerTls(tmp_path / "ca.crt", tmp_path / "server.pem", tmp_path / "server.key")
    secure = superlink_command(port=9200, tls=tls, database=tmp_path / "state.db",
                               supernode_auth=True)
    assert "--insecure" not in secure
    assert secure[secure.index("--ssl-ca-certfile") + 1] == str(tmp_path / "ca.crt")
    assert secure[secure.index("--ssl-keyfile") + 1] == str(tmp_path / "server.key")
    assert "--enable-supernode-auth" in secure and "--database" in secure

    node = supernode_command(superlink="127.0.0.1:9200", port=9201, root_certificates=INSECURE,
                             node_config={"site-name": "site_A", "site-config": "/s/a.toml"})
    assert "--insecure" in node
    assert node[node.index("--node-config") + 1] == 'site-name="site_A" site-config="/s/a.toml"'
    authed = supernode_command(superlink="coord:9200", port=9201, node_config={},
                               root_certificates=tmp_path / "ca.crt",
                               auth_private_key=tmp_path / "site_A")
    assert authed[authed.index("--auth-supernode-private-key") + 1] == str(tmp_path / "site_A")
    assert "--insecure" not in authed
    with pytest.raises(ValueError, match="needs TLS"):
        supernode_command(superlink="x:1", port=2, node_config={}, root_certificates=INSECURE,
                          auth_private_key=tmp_path / "k")

    assert flwr_run_command(tmp_path, "local", {"until": "combat"}) == [
        "flwr", "run", str(tmp_path), "local", "--stream", "--run-config", 'until="combat"']


def test_a_superlink_without_its_state_file_is_not_restarted(tmp_path: Path):
    federation = LocalFederation(tmp_path, {}, tmp_path / "federation", persistent=False)
    with pytest.raises(FederationError, match="in memory"):
        federation.restart_superlink()
    assert not any(p.name.startswith("superlink") for p in federation.processes)


def test_the_connection_file_is_flowers_toml(tmp_path: Path):
    path = write_connection(tmp_path / "home", "local", "127.0.0.1:9200",
                            root_certificates=INSECURE)
    assert tomllib.loads(path.read_text()) == {"superlink": {
        "default": "local", "local": {"address": "127.0.0.1:9200", "insecure": True}}}
    path = write_connection(tmp_path / "home", "study", "coord:9200",
                            root_certificates=tmp_path / "ca.crt")
    assert tomllib.loads(path.read_text())["superlink"]["study"] == {
        "address": "coord:9200", "root-certificates": str((tmp_path / "ca.crt").resolve())}
    with pytest.raises(ValueError, match="connection name"):
        write_connection(tmp_path, "a.b", "x:1", root_certificates=INSECURE)


def test_every_process_gets_its_home_no_telemetry_and_this_pythons_scripts(tmp_path: Path):
    env = flower_env(tmp_path / "home", tmp_path / "app", base={"PATH": "/usr/bin",
                                                                "PYTHONPATH": "/x"})
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert env["PYTHONPATH"] == f"{(tmp_path / 'app').resolve()}:/x"


def test_free_ports_are_distinct():
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(p > 0 for p in ports)


# a parent that ignores SIGTERM and starts a child in a new session (as Flower's SuperLink starts
# its SuperExec); both sleep
_TREE = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print("started", flush=True)
time.sleep(60)
"""


def test_stopping_reaches_children_in_other_sessions_and_kills_what_ignores_sigterm(
        tmp_path: Path):
    env = flower_env(tmp_path / "home")
    env[MARKER_ENV] = marker = f"test-{time.monotonic_ns()}"
    process = FlowerProcess.start("tree", [sys.executable, "-c", _TREE], tmp_path / "tree.log",
                                  env)
    process.wait_ready(30, log_pattern=re.compile("started"))
    deadline = time.monotonic() + 10
    while len(processes_marked(marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(processes_marked(marker)) == 2
    start = time.monotonic()
    killed = stop_processes([process], marker, grace_s=1.0)
    assert time.monotonic() - start < 10
    assert len(killed) == 2  # both ignore SIGTERM (the child inherits SIG_IGN): SIGKILL
    assert processes_marked(marker) == []
    assert process.popen.returncode is not None  # reaped


def test_a_process_that_exits_before_it_is_ready_is_reported_with_its_log(tmp_path: Path):
    process = FlowerProcess.start(
        "broken", [sys.executable, "-c", "print('cannot bind port 9200'); raise SystemExit(3)"],
        tmp_path / "broken.log", flower_env(tmp_path))
    with pytest.raises(FederationError, match=r"(?s)broken exited with 3.*cannot bind port"):
        process.wait_ready(30, port=("127.0.0.1", free_ports(1)[0]))
    sleeper = FlowerProcess.start("sleeper", [sys.executable, "-c", "import time; "
                                              "print('waiting', flush=True); time.sleep(60)"],
                                  tmp_path / "sleeper.log", flower_env(tmp_path))
    try:
        with pytest.raises(FederationError, match=r"(?s)not ready after 0.5 s.*waiting"):
            sleeper.wait_ready(0.5, port=("127.0.0.1", free_ports(1)[0]))
    finally:
        stop_processes([sleeper], grace_s=1.0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flower-superlink") is None,
                    reason="flower-superlink is not on PATH")
def test_failed_runs_say_why_and_leave_no_process(tmp_path: Path):
    site = tmp_path / "site_A.toml"  # never read: both runs fail before a site answers
    site.write_text('site_name = "site_A"\nmanifest = "m.csv"\n')
    with LocalFederation(APP_DIR, {"site_A": site}, tmp_path / "federation") as federation:
        unknown = federation.run({"no-such-key": 1}, timeout_s=120)
        # one site of the two asked for, and no time to wait: the ServerApp stops the study
        stopped = federation.run({"out-dir": str(tmp_path / "out"), "until": "handshake",
                                  "min-sites": 2, "timeout-s": 1.0}, timeout_s=120)
        # secure by default: TLS, and a SuperNode whose key was never registered is refused
        intruder = federation.start_node("intruder", site, register=False)
        try:
            intruder.popen.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"an unregistered SuperNode was not refused\n{intruder.describe()}")
        report = federation.report()
    commands = {p.name: p.command for p in federation.processes}
    assert "--enable-supernode-auth" in commands["superlink"]
    assert "--ssl-certfile" in commands["superlink"] and "--insecure" not in commands["superlink"]
    assert "--auth-supernode-private-key" in commands["supernode-site_A"]
    # Flower logs its exit code 305 and the process ends with status 1
    assert intruder.popen.returncode != 0 and not SUPERNODE_CONNECTED.search(intruder.tail(500))
    assert "Exit Code: 305" in intruder.tail(500)
    assert "Failed to activate SuperNode" in intruder.tail(500)
    assert not unknown.ok and unknown.status == "" and "no-such-key" in unknown.output
    # flwr run exits 0 although the ServerApp raised: the status says it failed, and why
    assert stopped.returncode == 0 and not stopped.ok and stopped.status == "finished:failed"
    assert "fewer than min-sites = 2" in stopped.status_details
    assert "finished:failed (ServerApp failed" in stopped.summary()
    assert "--- superlink (running" in report and "--- supernode-site_A (running" in report
    assert "--- flwr-run-2 (exited with 0" in report
    assert processes_marked(federation.marker) == []
    assert all(p.popen.poll() is not None for p in federation.processes)  # ended and reaped
