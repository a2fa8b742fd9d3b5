"""Start a study's Flower processes: the SuperLink, one SuperNode per site, and ``flwr run``.

The ``myelofed server``/``myelofed site`` commands and the deployment tests build on this. It
runs Flower's executables with :mod:`subprocess` and imports nothing from ``flwr`` (its one
call into Flower's code, the app's hash, goes through :mod:`client.supernode`).

Pieces, from small to large:

* :func:`superlink_command`, :func:`gateway_command`, :func:`supernode_command` (and
  :func:`approving`, the same through the site's app allow-list), :func:`flwr_run_command`:
  the command lines (argv lists). TLS and SuperNode authentication have their parameters
  already; passing :data:`INSECURE` instead of certificates gives a plaintext run with no
  node authentication, for loopback tests only.
* :func:`write_connection`: the ``[superlink.<name>]`` connection in ``$FLWR_HOME/config.toml``
  that ``flwr run <app> <name>`` reads.
* :func:`flower_env`: the environment every process gets (its ``FLWR_HOME``, no telemetry, no
  update check, no runtime ``uv sync`` of the app's dependencies, and ``PATH``/``PYTHONPATH``
  so that Flower's executables and the app's modules are found).
* :class:`LocalFederation`: a whole federation on this machine (loopback, insecure), as a
  context manager that always stops every process it started, even when its body raised.

Flower starts processes of its own (SuperExec, the ServerApp and every ClientApp), some in new
sessions, so killing our process groups is not enough: every process gets a marker variable
(:data:`MARKER_ENV`) in its environment, which Flower's children inherit, and
:func:`processes_marked` finds them all by it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final

import psutil

from common.errors import MyeloFedError

#: A scalar of Flower's run config and node config (TOML types).
ConfigValue = str | int | float | bool

#: Pass as ``tls``/``root_certificates`` for a plaintext run without SuperNode authentication:
#: anyone on the network can read the messages and join as a site. Loopback tests only.
INSECURE: Final = None

#: Where a SuperLink or SuperNode listens unless told otherwise: this machine only.
LOOPBACK: Final = "127.0.0.1"

#: The environment variable that marks every process of one federation (and Flower's children).
MARKER_ENV: Final = "MYELOFED_FEDERATION_ID"

#: What a SuperNode logs once the SuperLink has accepted it (Flower 1.42).
SUPERNODE_CONNECTED: Final = re.compile(r"SuperNode ID: \d+")

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")


class FederationError(MyeloFedError):
    """A Flower process did not start, did not get ready in time, or a run did not end in
    time. The message carries the tail of each process's log."""


# --- command lines --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerTls:
    """The SuperLink's TLS files (PEM): the study CA, the server certificate (with the
    coordinator's address in its subjectAltName) and its private key."""

    ca_certfile: Path
    certfile: Path
    keyfile: Path


def format_config(values: Mapping[str, ConfigValue]) -> str:
    """``values`` as Flower's ``--run-config``/``--node-config`` text: ``key=value`` pairs
    separated by spaces, each value a TOML scalar (strings quoted).

    Flower splits the text with a regular expression, so a string may hold spaces but no quote
    and no line break, and a key must be a bare TOML key; anything else is refused rather than
    silently cut.
    """
    for key in values:
        if not _BARE_KEY.fullmatch(key):
            raise ValueError(f"config key {key!r}: letters, digits, '_' and '-' only")
    return " ".join(f"{key}={_toml_scalar(value, key)}" for key, value in values.items())


def _toml_scalar(value: ConfigValue, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"config value {key}: {value} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        if any(c in value for c in "\"'\n\r"):
            raise ValueError(f"config value {key}: {value!r} holds a quote or a line break, "
                             "which Flower's config parser cannot take")
        return json.dumps(value)  # a TOML basic string: backslashes escaped, quoted
    raise TypeError(f"config value {key}: {type(value).__name__} is not a TOML scalar")


def superlink_command(*, port: int, tls: ServerTls | None, host: str = LOOPBACK,
                      database: Path | None = None, supernode_auth: bool = False
                      ) -> list[str]:
    """``flower-superlink`` on one ``port`` that serves the sites (Fleet API), the CLI
    (Control API) and the ServerApp (runtime).

    Parameters
    ----------
    port, host
        Where it listens. A real coordinator binds its public interface, and must then keep
        the Control API from the network (it has no authentication in Flower's free edition).
    tls
        The server's TLS files, or :data:`INSECURE` (plaintext).
    database
        A SQLite file for the SuperLink's state (runs, registered nodes); None = in memory.
    supernode_auth
        Accept only SuperNodes whose public key was registered (``flwr supernode register``).

    The app's dependencies are never installed at run time (``--disable-runtime-dependency-
    installation``): every machine of the study has them installed beforehand.
    """
    command = ["flower-superlink", "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
    if tls is None:  # INSECURE
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(tls.ca_certfile), "--ssl-certfile", str(tls.certfile),
                    "--ssl-keyfile", str(tls.keyfile)]
    if database is not None:
        command += ["--database", str(database)]
    if supernode_auth:
        command.append("--enable-supernode-auth")
    return command


def supernode_command(*, superlink: str, port: int, node_config: Mapping[str, ConfigValue],
                      root_certificates: Path | None, auth_private_key: Path | None = None,
                      host: str = LOOPBACK) -> list[str]:
    """``flower-supernode`` for one site.

    Parameters
    ----------
    superlink
        The SuperLink's ``host:port``.
    port, host
        The SuperNode's own runtime API (its ClientApps connect to it): every SuperNode on one
        machine needs its own port.
    node_config
        What the site's ClientApp reads from its context: ``site-name`` and ``site-config`` (the
        absolute path of the site config file; see :func:`client.study.resolve_site`).
    root_certificates
        The study CA that signed the SuperLink's certificate, or :data:`INSECURE`.
    auth_private_key
        The site's EC private key (``ssh-keygen -t ecdsa``) when the SuperLink authenticates
        SuperNodes; its public key must have been registered. Not allowed with INSECURE.
    """
    command = ["flower-supernode", "--superlink", superlink, "--host", host, "--port", str(port),
               "--node-config", format_config(node_config)]
    if root_certificates is None:  # INSECURE
        if auth_private_key is not None:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses a key with "
                             "--insecure)")
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(root_certificates)]
    if auth_private_key is not None:
        command += ["--auth-supernode-private-key", str(auth_private_key)]
    return command


def approving(command: Sequence[str], site: str, approved_apps: Sequence[str] | None
              ) -> list[str]:
    """A ``flower-supernode`` command line run through :mod:`client.supernode`, which refuses
    every run whose app bundle's SHA-256 is not in ``approved_apps`` (None: any app, for tests
    of something else)."""
    if not command or command[0] != "flower-supernode":
        raise ValueError(f"not a flower-supernode command: {command[:1]}")
    allow = (["--allow-any-app"] if approved_apps is None else
             [a for h in approved_apps for a in ("--approve", h)])
    return [sys.executable, "-m", "client.supernode", "--site", site, *allow, "--",
            *command[1:]]


def gateway_command(*, port: int, superlink_port: int, secrets: Path | None,
                    host: str = LOOPBACK) -> list[str]:
    """The fleet gateway (:mod:`server.gateway`) on ``host:port`` in front of the SuperLink on
    ``127.0.0.1:superlink_port``; ``secrets`` is the folder with ``ca.crt``, ``server.pem`` and
    ``server.key`` (``myelofed server certs``), or :data:`INSECURE`."""
    command = [sys.executable, "-m", "common.cli", "server", "gateway", "--host", host,
               "--port", str(port), "--superlink-port", str(superlink_port)]
    return command + (["--insecure"] if secrets is None else ["--secrets", str(secrets)])


def flwr_run_command(app_dir: Path, connection: str, run_config: Mapping[str, ConfigValue],
                     stream: bool = True) -> list[str]:
    """``flwr run``: bundle ``app_dir`` (the folder with the app's ``pyproject.toml``), send it
    to the SuperLink of ``connection`` (a name in ``$FLWR_HOME/config.toml``) and start a run
    with ``run_config`` over the app's defaults (every key must exist in its
    ``[tool.flwr.app.config]``). ``stream``: print the ServerApp's log until the run ends."""
    command = ["flwr", "run", str(app_dir), connection]
    if stream:
        command.append("--stream")
    if run_config:
        command += ["--run-config", format_config(run_config)]
    return command


def flwr_ls_command(connection: str, run_id: str) -> list[str]:
    """``flwr ls``: one run's status (``finished:completed``, ``finished:failed``, ...), its
    reason and its traffic, as JSON."""
    return ["flwr", "ls", connection, "--run-id", run_id, "--format", "json"]


def write_connection(flwr_home: Path, name: str, address: str, *,
                     root_certificates: Path | None) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection ``name`` (also the
    default) at ``address`` (``host:port``); ``root_certificates`` is the study CA, or
    :data:`INSECURE`. Returns the file's path."""
    if not _BARE_KEY.fullmatch(name):
        raise ValueError(f"connection name {name!r}: letters, digits, '_' and '-' only")
    security = ("insecure = true" if root_certificates is None else
                f"root-certificates = {_toml_scalar(str(Path(root_certificates).resolve()), name)}")
    path = flwr_home / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n'
                    f"[superlink.{name}]\naddress = {_toml_scalar(address, name)}\n{security}\n",
                    encoding="utf-8")
    return path


def flower_env(flwr_home: Path, app_dir: Path | None = None,
               base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process: ``base`` (default: this process's) with its own
    ``FLWR_HOME``, telemetry and update checks off (sites are offline), no runtime installation
    of the app's dependencies (else ``flwr run`` would ``uv sync`` them, GBs of torch), this
    Python's scripts first on ``PATH`` and ``app_dir`` first on ``PYTHONPATH``."""
    env = dict(os.environ if base is None else base)
    scripts = str(Path(sys.executable).parent)  # the venv's bin (not resolved: a symlink)
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PATH": os.pathsep.join(filter(None, [scripts, env.get("PATH", "")])),
                "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "COLUMNS": "200"})
    if app_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(app_dir).resolve()), env.get("PYTHONPATH", "")]))
    return env


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct TCP ports free on ``host`` now (held together while chosen, so they
    differ; another program could still take one before Flower binds it)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# --- processes ------------------------------------------------------------------------------------

def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, colour codes removed ("" when absent)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(_ANSI.sub("", text).splitlines()[-lines:])


@dataclass
class FlowerProcess:
    """One started executable: its name, command, log file and ``Popen`` (in its own process
    group, so a signal reaches the children that stay in it)."""

    name: str
    command: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    @classmethod
    def start(cls, name: str, command: Sequence[str], log_path: Path, env: Mapping[str, str],
              cwd: Path | None = None, nice: int = 0) -> FlowerProcess:
        """Start ``command`` with stdout and stderr into ``log_path`` (which starts with the
        command line), at scheduling priority ``nice`` (its children inherit it)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            log.write(("$ " + " ".join(command) + "\n").encode())
            log.flush()
            popen = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=dict(env), cwd=cwd,
                                     start_new_session=True,
                                     preexec_fn=(lambda: os.nice(nice)) if nice else None)
        return cls(name, list(command), log_path, popen)

    def tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def describe(self, lines: int = 40) -> str:
        """Name, state and log tail, for an error message."""
        code = self.popen.poll()
        state = "running" if code is None else f"exited with {code}"
        return f"--- {self.name} ({state}; log {self.log_path}) ---\n{self.tail(lines)}"

    def wait_ready(self, timeout_s: float, *, port: tuple[str, int] | None = None,
                   log_pattern: re.Pattern[str] | None = None) -> None:
        """Wait until ``port`` accepts connections and ``log_pattern`` is in the log; raise
        :class:`FederationError` (with the log tail) when the process exits or time is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            port_ok = port is None or port_open(*port)
            log_ok = log_pattern is None or bool(log_pattern.search(self.tail(10_000)))
            if port_ok and log_ok:
                return
            if self.popen.poll() is not None:
                raise FederationError(f"{self.name} exited with {self.popen.returncode} before "
                                      f"it was ready\n{self.describe()}")
            if time.monotonic() > deadline:
                waited = " and ".join(filter(None, [
                    f"port {port[0]}:{port[1]}" if port is not None and not port_ok else "",
                    f"log line /{log_pattern.pattern}/"
                    if log_pattern is not None and not log_ok else ""]))
                raise FederationError(f"{self.name} not ready after {timeout_s:g} s (waited "
                                      f"for {waited})\n{self.describe()}")
            time.sleep(0.2)


def processes_marked(marker: str) -> list[psutil.Process]:
    """This user's processes whose environment has ``MARKER_ENV=marker``."""
    found = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != os.getuid():
                continue
            if proc.environ().get(MARKER_ENV) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_processes(processes: Iterable[FlowerProcess], marker: str | None = None,
                   grace_s: float = 10.0) -> list[str]:
    """Stop ``processes`` with everything they started: SIGTERM to each process group, each
    descendant and each process marked with ``marker``; SIGKILL to those alive after
    ``grace_s``. Returns a line for each process that had to be killed."""
    processes = list(processes)
    killed: list[str] = []
    for _ in range(3):  # a process may start a child while we stop its parent: look again
        targets = _targets(processes, marker)
        if not targets:
            break
        for group in {_pgid(p) for p in processes if p.popen.poll() is None} - {None}:
            _signal_group(group, signal.SIGTERM)
        for proc in targets:
            _signal(proc, signal.SIGTERM)
        _, alive = psutil.wait_procs(targets, timeout=grace_s)
        for proc in alive:
            killed.append(_describe_proc(proc))
            _signal(proc, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
    for process in processes:  # reap our own children (no zombies)
        try:
            process.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _signal_group(process.popen.pid, signal.SIGKILL)
            process.popen.wait(timeout=5)
    return killed


def _targets(processes: list[FlowerProcess], marker: str | None) -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for process in processes:
        if process.popen.poll() is not None:
            continue
        try:
            root = psutil.Process(process.popen.pid)
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc
        except psutil.NoSuchProcess:
            continue
    for proc in processes_marked(marker) if marker else []:
        found.setdefault(proc.pid, proc)
    return [p for p in found.values() if _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pgid(process: FlowerProcess) -> int | None:
    try:
        return os.getpgid(process.popen.pid)
    except ProcessLookupError:
        return None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    if pgid == os.getpgrp():  # never our own group
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal(proc: psutil.Process, sig: signal.Signals) -> None:
    try:
        proc.send_signal(sig)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


def _describe_proc(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid}: {' '.join(proc.cmdline())[:200]}"
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return str(proc.pid)


# --- a federation on this machine -----------------------------------------------------------------

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
    default the SHA-256 of ``app_dir``'s bundle (:func:`client.supernode.app_hash`).

    On entry it picks free ports, starts ``flower-superlink`` and waits for its port, starts
    the fleet gateway in front of it (:mod:`server.gateway`; the sites' port then serves only
    Flower's Fleet API, as on a real coordinator; ``gateway=False``: the sites connect to the
    SuperLink itself), then starts
    the SuperNodes (node config ``site-name`` and ``site-config``) and waits until the
    SuperLink accepted each. Secure (the default), it first makes a study CA and the
    SuperLink's certificate for the loopback address, and a key pair per site
    (:mod:`common.security`, under ``secrets/``); the SuperLink serves TLS and refuses any
    SuperNode whose public key is not registered; each site's key is registered
    (``flwr supernode register``) before its SuperNode starts. ``secure=False``: plaintext and
    no node authentication, for tests that measure something else. On exit it stops every process it started and every process they
    started (:func:`stop_processes`), even when the body raised.

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
        """The environment of process ``name``: :func:`flower_env` with its own FLWR_HOME and
        this federation's marker."""
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
        from common.security import make_server_credentials

        if self.approved_apps is None:  # the sites approve this federation's own app
            from client.supernode import app_hash

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
            database=self.folder / "superlink.db", supernode_auth=self.secure)
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
                 for (site, path), port in zip(self.sites.items(), ports[2:])]
        for node in nodes:
            node.wait_ready(self.ready_timeout_s, log_pattern=SUPERNODE_CONNECTED)

    def start_node(self, site: str, site_config: Path, port: int | None = None, *,
                   register: bool = True, approved_apps: tuple[str, ...] | None = None,
                   name: str | None = None) -> FlowerProcess:
        """Start one site's SuperNode (not waiting for it). Secure: with a new key pair of
        its own, registered at the SuperLink first unless ``register`` is False (such a node
        is refused). It runs the apps of ``approved_apps`` (default: the federation's)."""
        from common.security import SiteKey, make_site_key

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
        count = sum(p.name.startswith("superlink") for p in self.processes)
        superlink = self._spawn(f"superlink-restart{count}", self.superlink_argv)
        superlink.wait_ready(self.ready_timeout_s, port=(self.host, self.superlink_port))
        return superlink

    def _kill(self, prefix: str) -> None:
        """SIGKILL the running process named ``prefix...`` and all it started."""
        process = next(p for p in reversed(self.processes)
                       if p.name.startswith(prefix) and p.popen.poll() is None)
        for proc in _targets([process], marker=None):
            _signal(proc, signal.SIGKILL)
        process.popen.wait(timeout=30)

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
        started = _RUN_STARTED.search(output)
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
        """Stop every process of this federation (see :func:`stop_processes`)."""
        self.killed += stop_processes(reversed(self.processes), self.marker, self.grace_s)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
