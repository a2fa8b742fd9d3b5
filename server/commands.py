"""The command lines of a study's Flower processes, and the files and environment they need.

Each function returns an argv list for :mod:`subprocess` (nothing here starts a process; see
:mod:`server.processes` and :mod:`server.federation`), and nothing here imports ``flwr``:

* :func:`superlink_command`, :func:`gateway_command`, :func:`supernode_command` (and
  :func:`approving`, the same through the site's app allow-list, :mod:`client.supernode`),
  :func:`flwr_run_command`, :func:`flwr_ls_command`. TLS and SuperNode authentication have
  their parameters already; passing :data:`INSECURE` instead of certificates gives a plaintext
  run with no node authentication, for loopback tests only.
* :func:`format_config`: a run config or node config as Flower's command-line text.
* :func:`write_connection`: the ``[superlink.<name>]`` connection in ``$FLWR_HOME/config.toml``
  that ``flwr run <app> <name>`` reads.
* :func:`flower_env`: the environment every process gets (its ``FLWR_HOME``, no telemetry, no
  update check, no runtime ``uv sync`` of the app's dependencies, and ``PATH``/``PYTHONPATH``
  so that Flower's executables and the app's modules are found).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: A scalar of Flower's run config and node config (TOML types).
ConfigValue = str | int | float | bool

#: Pass as ``tls``/``root_certificates`` for a plaintext run without SuperNode authentication:
#: anyone on the network can read the messages and join as a site. Loopback tests only.
INSECURE: Final = None

#: Where a SuperLink or SuperNode listens unless told otherwise: this machine only.
LOOPBACK: Final = "127.0.0.1"

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


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


def approving(command: Sequence[str], site: str, approved_apps: Sequence[str] | None,
              site_config: Path | None = None) -> list[str]:
    """A ``flower-supernode`` command line run through :mod:`client.supernode`, which refuses
    every run whose app bundle's SHA-256 is not in ``approved_apps`` (None: any app, for tests
    of something else), and reads them again from ``site_config`` on SIGHUP."""
    if not command or command[0] != "flower-supernode":
        raise ValueError(f"not a flower-supernode command: {command[:1]}")
    allow = (["--allow-any-app"] if approved_apps is None else
             [a for h in approved_apps for a in ("--approve", h)])
    reload = [] if site_config is None else ["--site-config", str(site_config)]
    return [sys.executable, "-m", "client.supernode", "--site", site, *allow, *reload, "--",
            *command[1:]]


def gateway_command(*, port: int, superlink_port: int, secrets: Path | None,
                    host: str = LOOPBACK) -> list[str]:
    """The fleet gateway (:mod:`server.gateway`) on ``host:port`` in front of the SuperLink on
    ``127.0.0.1:superlink_port``; ``secrets`` is the folder with ``ca.crt``, ``server.pem`` and
    ``server.key`` (``myelofed server certs``), or :data:`INSECURE`."""
    command = [sys.executable, "-m", "cli.main", "server", "gateway", "--host", host,
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
