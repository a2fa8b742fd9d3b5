"""A whole federation on this machine: a SuperLink, the fleet gateway and one SuperNode per
site on loopback, secure by default, for the deployment tests and the benchmarks.

:class:`LocalFederation` is a context manager that always stops every process it started, even
when its body raised; :meth:`LocalFederation.run` starts a study with ``flwr run`` and returns
how it ended (:class:`RunResult`). The command lines come from :mod:`server.commands`, the
process control from :mod:`server.processes`; nothing here imports ``flwr`` except through
:func:`common.bundle.app_hash` (Flower builds the app bundle whose hash the sites approve).
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from common.bundle import app_hash
from common.security import SiteKey, make_server_credentials, make_site_key
from server.commands import (
    INSECURE,
    LOOPBACK,
    ConfigValue,
    ServerTls,
    approving,
    flower_env,
    flwr_ls_command,
    flwr_run_command,
    gateway_command,
    superlink_command,
    supernode_command,
    write_connection,
)
from server.processes import (
    MARKER_ENV,
    SUPERNODE_CONNECTED,
    FederationError,
    FlowerProcess,
    free_ports,
    kill_now,
    log_tail,
    stop_processes,
)

RUN_STARTED = re.compile(r"Successfully started run (\d+)")


@dataclass(frozen=True)
class RunResult:
    """How a run ended.

    ``flwr run --stream`` exits 0 even when the ServerApp raised (Flower 1.42), so the run's
    own status is asked from the SuperLink afterwards (``flwr ls``): ``status`` is e.g.
    ``finished:completed`` or ``finished:failed`` ("" when the run never started, e.g. a run
    config key the app does not have), and ``status_details`` the ServerApp's exception.
    ``output`` is what ``flwr run`` printed (the ServerApp's log; colour codes removed).
    """

    returncode: int
    output: str
    wall_s: float
    run_id: str = ""
    status: str = ""
    status_details: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status == "finished:completed"

    def summary(self) -> str:
        """One line: exit code, run id, status and its reason."""
        return (f"flwr run exited with {self.returncode} after {self.wall_s:.1f} s; run "
                f"{self.run_id or '(none started)'}: {self.status or 'no status'}"
                f"{f' ({self.status_details})' if self.status_details not in ('', 'N/A') else ''}")


@dataclass
class LocalFederation:
    """A SuperLink and one SuperNode per site on this machine, on loopback; secure unless
    ``secure=False`` is asked for explicitly.

    ::

        with LocalFederation(app_dir, {"site_A": Path("/abs/site_A.toml"), ...}, folder) as fed:
            result = fed.run({"out-dir": "/abs/out", "until": "model"}, timeout_s=900)
        if not result.ok:
            raise AssertionError(f"{result.summary()}\n{fed.report()}")

    Each SuperNode runs only approved apps (:mod:`client.supernode`): ``approved_apps``, by
    default the SHA-256 of ``app_dir``'s bundle (:func:`common.bundle.app_hash`).

    On entry it picks free ports, starts ``flower-superlink`` and waits for its port, starts
    the fleet gateway in front of it (:mod:`server.gateway`; the sites' port then serves only
    Flower's Fleet API, as on a real coordinator; ``gateway=False``: the sites connect to the
    SuperLink itself), then starts the SuperNodes (node config ``site-name`` and
    ``site-config``) and waits until the SuperLink accepted each. Secure (the default), it
    first makes a study CA and the SuperLink's certificate for the loopback address, and a key
    pair per site (:mod:`common.security`, under ``secrets/``); the SuperLink serves TLS and
    refuses any SuperNode whose public key is not registered; each site's key is registered
    (``flwr supernode register``) before its SuperNode starts. ``secure=False``: plaintext and
    no node authentication, for tests that measure something else. On exit it stops every
    process it started and every process they started
    (:func:`server.processes.stop_processes`), even when the body raised.

    Everything goes under ``folder``: ``logs/<process>.log``, and a ``FLWR_HOME`` per process
    (``flwr-home/<process>``; ``flwr run`` shares the SuperLink's, where the connection is
    written), as each hospital and the coordinator have their own.

    Parameters
    ----------
    app_dir
        The Flower app (the folder with its ``pyproject.toml``); ``flwr run`` bundles the
        ``*.py``/``*.toml``/... files there and sends them to every site: keep data elsewhere.
    sites
        Site name -> the absolute path of its site config file.
    folder
        Where logs and Flower's homes go.
    ready_timeout_s
        How long each process may take to get ready.
    grace_s
        How long processes get between SIGTERM and SIGKILL on exit.
    site_nice
        The scheduling priority of the SuperNodes and their ClientApps (``nice``): with many
        sites on one machine, a positive value keeps them from starving the SuperLink, as
        when each site has a machine of its own. Flower's SuperLink gives up on a write
        after waiting 5 s for its SQLite database, which 20 sites on 2 cores can cause.
    persistent
        The SuperLink keeps its state (registered nodes, runs, messages) in an SQLite file in
        ``folder``, as ``myelofed server start`` does, so that :meth:`restart_superlink` finds
        it. ``False``: in memory (Flower's default without ``--database``), which has no such
        5 s limit; a restart then starts empty.
    """

    app_dir: Path
    sites: Mapping[str, Path]
    folder: Path
    ready_timeout_s: float = 60.0
    grace_s: float = 10.0
    connection: str = "local"
    host: str = LOOPBACK
    secure: bool = True
    gateway: bool = True
    approved_apps: tuple[str, ...] | None = None
    site_nice: int = 0
    persistent: bool = True
    processes: list[FlowerProcess] = field(default_factory=list, init=False)
    ca_cert: Path | None = field(default=None, init=False)
    marker: str = field(default_factory=lambda: uuid.uuid4().hex, init=False)
    superlink_port: int = field(default=0, init=False)
    gateway_port: int = field(default=0, init=False)
    node_args: dict[str, tuple[Path, int, tuple[str, ...] | None]] = field(
        default_factory=dict, init=False)
    superlink_argv: list[str] = field(default_factory=list, init=False)
    killed: list[str] = field(default_factory=list, init=False)

    @property
    def address(self) -> str:
        """The SuperLink's own ``host:port``: the coordinator's CLI and the ServerApp (and the
        sites too when there is no gateway)."""
        return f"{self.host}:{self.superlink_port}"

    @property
    def fleet_address(self) -> str:
        """Where the sites connect: the fleet gateway, or the SuperLink without one."""
        return f"{self.host}:{self.gateway_port}" if self.gateway else self.address

    def env(self, name: str) -> dict[str, str]:
        """The environment of process ``name``: :func:`server.commands.flower_env` with its own
        FLWR_HOME and this federation's marker."""
        env = flower_env(self.folder / "flwr-home" / name, self.app_dir)
        env[MARKER_ENV] = self.marker
        return env

    def __enter__(self) -> LocalFederation:
        self.app_dir = Path(self.app_dir).resolve()
        self.folder = Path(self.folder).resolve()
        for site, path in self.sites.items():
            if not Path(path).is_absolute():
                raise ValueError(f"site {site}: site config {path} is not an absolute path "
                                 "(SuperNodes read it from their own working folder)")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self.approved_apps is None:  # the sites approve this federation's own app
            self.approved_apps = (app_hash(self.app_dir),)
        ports = free_ports(2 + len(self.sites), self.host)
        self.superlink_port, self.gateway_port = ports[:2]
        tls = INSECURE
        secrets = self.folder / "secrets" / "coordinator"
        if self.secure:
            credentials = make_server_credentials(secrets, ["localhost", self.host])
            tls = ServerTls(credentials.ca_cert, credentials.cert, credentials.key)
            self.ca_cert = credentials.ca_cert
        self.superlink_argv = superlink_command(
            port=self.superlink_port, tls=tls, host=self.host,
            database=self.folder / "superlink.db" if self.persistent else None,
            supernode_auth=self.secure)
        superlink = self._spawn("superlink", self.superlink_argv)
        superlink.wait_ready(self.ready_timeout_s, port=(self.host, self.superlink_port))
        if self.gateway:
            self._spawn("gateway", gateway_command(
                port=self.gateway_port, superlink_port=self.superlink_port, host=self.host,
                secrets=secrets if self.secure else INSECURE)).wait_ready(
                    self.ready_timeout_s, port=(self.host, self.gateway_port))
        write_connection(self.folder / "flwr-home" / "superlink", self.connection, self.address,
                         root_certificates=self.ca_cert)
        nodes = [self.start_node(site, path, port)
                 for (site, path), port in zip(self.sites.items(), ports[2:], strict=True)]
        for node in nodes:
            node.wait_ready(self.ready_timeout_s, log_pattern=SUPERNODE_CONNECTED)

    def start_node(self, site: str, site_config: Path, port: int | None = None, *,
                   register: bool = True, approved_apps: tuple[str, ...] | None = None,
                   name: str | None = None) -> FlowerProcess:
        """Start one site's SuperNode (not waiting for it). Secure: with a new key pair of
        its own, registered at the SuperLink first unless ``register`` is False (such a node
        is refused). It runs the apps of ``approved_apps`` (default: the federation's)."""
        port = port or free_ports(1, self.host)[0]
        self.node_args[site] = (Path(site_config), port, approved_apps)
        key = None
        if self.secure:
            keys = self.folder / "secrets" / "sites"
            if (keys / site).exists():  # a restart: the same key, so the same node id
                key = SiteKey(keys / site, keys / f"{site}.pub")
            else:
                key = make_site_key(keys, site)
                if register:
                    self.register(site, key.public)
        command = supernode_command(
            superlink=self.fleet_address, port=port, host=self.host,
            root_certificates=self.ca_cert, auth_private_key=None if key is None else key.private,
            node_config={"site-name": site, "site-config": str(site_config)})
        return self._spawn(name or f"supernode-{site}",
                           approving(command, site, approved_apps or self.approved_apps),
                           nice=self.site_nice)

    def kill_node(self, site: str) -> None:
        """Kill ``site``'s SuperNode and the ClientApp it runs (SIGKILL: a crash or a pulled
        cable, no goodbye to the SuperLink)."""
        self._kill(f"supernode-{site}")

    def kill_superlink(self) -> None:
        """Kill the SuperLink and what it runs (the ServerApp): the coordinator's machine going
        down in the middle of a study. Its database stays."""
        self._kill("superlink")

    def restart_superlink(self) -> FlowerProcess:
        """Start the SuperLink again, on its port and with its database (registered nodes,
        past runs), and wait for its port."""
        if not self.persistent:
            raise FederationError("the SuperLink kept its state in memory (persistent=False): "
                                  "a restart would not know the sites")
        count = sum(p.name.startswith("superlink") for p in self.processes)
        superlink = self._spawn(f"superlink-restart{count}", self.superlink_argv)
        superlink.wait_ready(self.ready_timeout_s, port=(self.host, self.superlink_port))
        return superlink

    def _kill(self, prefix: str) -> None:
        """SIGKILL the running process named ``prefix...`` and all it started."""
        kill_now(next(p for p in reversed(self.processes)
                      if p.name.startswith(prefix) and p.popen.poll() is None))

    def restart_node(self, site: str, timeout_s: float = 300.0, every_s: float = 5.0
                     ) -> FlowerProcess:
        """Start ``site``'s SuperNode again (same config, port, key and node id) and wait until
        the SuperLink has accepted it, as a site's service manager would (systemd
        ``Restart=always``, Docker's restart policy): until the SuperLink has seen the old
        process's heartbeats stop (about a minute), it refuses to activate the same node
        (Flower exit code 305), so a refused start is tried again every ``every_s``."""
        config, port, approved = self.node_args[site]
        deadline = time.monotonic() + timeout_s
        for attempt in itertools.count(1):
            node = self.start_node(site, config, port, approved_apps=approved,
                                   name=f"supernode-{site}-restart{attempt}")
            try:
                node.wait_ready(max(1.0, deadline - time.monotonic()),
                                log_pattern=SUPERNODE_CONNECTED)
                return node
            except FederationError:
                if node.popen.poll() is None or time.monotonic() + every_s > deadline:
                    raise
                time.sleep(every_s)
        raise AssertionError("unreachable")

    def register(self, site: str, public_key: Path) -> None:
        """``flwr supernode register``: let the SuperNode holding ``public_key``'s private
        key join (through the SuperLink's control interface, as the coordinator)."""
        done = subprocess.run(["flwr", "supernode", "register", str(public_key),
                               self.connection, "--name", site], capture_output=True,
                              text=True, env=self.env("superlink"), cwd=self.folder, timeout=60)
        if done.returncode != 0:
            raise FederationError(f"registering {site}'s key failed ({done.returncode}): "
                                  f"{(done.stdout + done.stderr).strip()[-2000:]}")

    def _spawn(self, name: str, command: list[str], nice: int = 0) -> FlowerProcess:
        process = FlowerProcess.start(name, command, self.folder / "logs" / f"{name}.log",
                                      self.env(name), cwd=self.folder, nice=nice)
        self.processes.append(process)
        return process

    def run(self, run_config: Mapping[str, ConfigValue], timeout_s: float) -> RunResult:
        """``flwr run <app_dir> <connection> --stream --run-config ...``; waits until it ends.

        Raises :class:`FederationError` (with every log's tail) when it has not ended after
        ``timeout_s``: set the app's own timeouts below that, so that a hung round fails in
        the app with a reason first.
        """
        command = flwr_run_command(self.app_dir, self.connection, run_config)
        name = f"flwr-run-{1 + sum(p.name.startswith('flwr-run') for p in self.processes)}"
        process = FlowerProcess.start(name, command, self.folder / "logs" / f"{name}.log",
                                      self.env("superlink"), cwd=self.folder)
        self.processes.append(process)
        start = time.monotonic()
        try:
            code = process.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise FederationError(f"flwr run did not end within {timeout_s:g} s\n"
                                  f"{self.report()}") from None
        wall_s = time.monotonic() - start
        output = log_tail(process.log_path, 10_000)
        started = RUN_STARTED.search(output)
        if started is None:
            return RunResult(code, output, wall_s)
        run_id = started.group(1)
        status, details = self.run_status(run_id)
        return RunResult(code, output, wall_s, run_id, status, details)

    def run_status(self, run_id: str) -> tuple[str, str]:
        """A run's status and its details, from the SuperLink (``flwr ls``); ("", why) when
        it cannot be had."""
        try:
            done = subprocess.run(flwr_ls_command(self.connection, run_id), capture_output=True,
                                  text=True, env=self.env("superlink"), cwd=self.folder,
                                  timeout=60)
            runs = json.loads(done.stdout).get("runs") or [{}]
            return str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))
        except (subprocess.TimeoutExpired, json.JSONDecodeError, AttributeError) as exc:
            return "", f"flwr ls failed: {type(exc).__name__}"

    def report(self, lines: int = 40) -> str:
        """Every process's state and log tail (for a failure message)."""
        return "\n".join(p.describe(lines) for p in self.processes)

    def stop(self) -> None:
        """Stop every process of this federation (see
        :func:`server.processes.stop_processes`)."""
        self.killed += stop_processes(reversed(self.processes), self.marker, self.grace_s)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
