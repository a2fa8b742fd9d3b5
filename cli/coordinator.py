"""``myelofed server`` and ``myelofed report``: what the study coordinator runs. Its SuperLink
listens on loopback only; the fleet gateway (:mod:`server.gateway`) alone faces the sites."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli import supervise
from cli.console import Typer, console, fail_config, need, out
from cli.exit_codes import ExitCode
from common.errors import ConfigError
from common.security import make_server_credentials
from server.commands import LOOPBACK, ServerTls, flower_env, superlink_command, write_connection
from server.registry import (
    check_new,
    load_registry,
    record,
    registered,
    registry_path,
    remove,
)

app = Typer(help="Commands the study coordinator runs.")

#: The name of the coordinator's own connection to its SuperLink in its FLWR_HOME.
CONNECTION = "study"


@app.command("certs")
def server_certs(
    host: Annotated[list[str], typer.Option(
        "--host", help="A DNS name or IP address the sites use to reach the coordinator "
        "(repeat for several; all go in the certificate).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the files go.")
                       ] = Path("coordinator-secrets"),
    study: Annotated[str, typer.Option(help="The study's name, in the CA's name.")
                     ] = "MyeloFed study",
) -> None:
    """Make the study's TLS certificate authority and the SuperLink's certificate.

    \b
    Writes ca.crt (public: give it to every site), ca.key, server.pem and server.key (the keys
    readable by their owner only; keep them on the coordinator). Never overwrites."""
    try:
        made = make_server_credentials(out_dir, host, study)
    except ConfigError as exc:
        fail_config(exc)
    out.print(f"study CA (give to every site): {made.ca_cert}")
    out.print(f"SuperLink certificate and key (keep here): {made.cert}, {made.key}")


@app.command("start")
def server_start(
    secrets: Annotated[Path, typer.Option(help="The folder 'myelofed server certs' wrote: "
                                          "ca.crt, server.pem, server.key.")
                       ] = Path("coordinator-secrets"),
    state: Annotated[Path, typer.Option(help="The SuperLink's database and the coordinator's "
                                        "FLWR_HOME.")] = Path("coordinator-state"),
    host: Annotated[str, typer.Option(help="The interface the sites reach.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="The sites' port (the fleet gateway).")] = 9092,
    control_port: Annotated[int, typer.Option(
        help="The SuperLink's own port, on loopback only: the coordinator's flwr CLI and the "
        "ServerApp use it.")] = 9093,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Plaintext, no SuperNode authentication: loopback tests only.")
    ] = False,
) -> None:
    """Start the coordinator: the SuperLink on loopback, and the fleet gateway that
    alone faces the sites.

    \b
    The SuperLink runs with TLS and SuperNode authentication (only keys registered with
    'myelofed server register' may join), its state on disk and no runtime installs. It listens
    on 127.0.0.1:<control-port>, because Flower serves its unauthenticated Control API (start
    runs, register nodes) on the same port as the sites' Fleet API. The gateway listens on
    <host>:<port> with the same certificate and forwards only the Fleet API to it (see
    server/gateway.py). Also writes the coordinator's connection ('study', to the loopback
    port) to <state>/flwr-home, which 'myelofed server register' and 'flwr run <app> study'
    use. Stops both on SIGINT/SIGTERM, or when the SuperLink exits, with every process the
    SuperLink started (SuperExec, a running ServerApp): a restart on the same ports works, and
    'flwr run' of the study into the same out-dir resumes it."""
    tls = _server_tls(secrets, insecure)
    state = state.resolve()
    home = state / "flwr-home"
    write_connection(home, CONNECTION, f"{LOOPBACK}:{control_port}",
                     root_certificates=None if tls is None else tls.ca_certfile.resolve())
    command = superlink_command(port=control_port, tls=tls, host=LOOPBACK,
                                database=state / "superlink.db", supernode_auth=tls is not None)
    supervise.exit_on_sigterm()
    superlink = supervise.start("SuperLink", command, flower_env(home))
    try:
        if not supervise.wait_for_port(superlink, LOOPBACK, control_port, timeout_s=60):
            console.print(f"[bold red]error:[/] the SuperLink did not start on "
                          f"{LOOPBACK}:{control_port} (exit {superlink.poll()})")
            raise typer.Exit(ExitCode.INTERNAL)
        _serve_gateway(host, port, control_port, tls,
                       watch=supervise.exited(superlink, "SuperLink"))
    finally:
        superlink.stop()
    if superlink.returncode not in (0, -15, None):
        raise typer.Exit(ExitCode.INTERNAL)


def _server_tls(secrets: Path, insecure: bool) -> ServerTls | None:
    """The coordinator's TLS files from ``secrets`` (each checked), or None when insecure."""
    if insecure:
        return None
    tls = ServerTls(secrets / "ca.crt", secrets / "server.pem", secrets / "server.key")
    need(tls.ca_certfile, tls.certfile, tls.keyfile)
    return tls


def _serve_gateway(host: str, port: int, superlink_port: int, tls: ServerTls | None,
                   watch: Callable[[], Awaitable[None]] | None = None) -> None:
    """The fleet gateway on ``host:port`` with the SuperLink's certificate (``tls``; None:
    plaintext) in front of the SuperLink on loopback, until stopped or ``watch`` returns."""
    from server.gateway import Listen, Upstream, serve  # deferred: heavy (see cli/__init__.py)

    if tls is None:
        serve(Listen(host, port), Upstream(LOOPBACK, superlink_port, None), watch=watch)
    else:
        serve(Listen(host, port, tls.certfile, tls.keyfile),
              Upstream(LOOPBACK, superlink_port, tls.ca_certfile), watch=watch)


@app.command("gateway")
def server_gateway(
    superlink_port: Annotated[int, typer.Option(help="The SuperLink's port on loopback.")],
    secrets: Annotated[Path, typer.Option(help="As for 'myelofed server start'.")
                       ] = Path("coordinator-secrets"),
    host: Annotated[str, typer.Option(help="The interface the sites reach.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="The sites' port.")] = 9092,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Plaintext on both sides: loopback tests only.")] = False,
) -> None:
    """Only the fleet gateway, in front of a SuperLink already running on loopback (what
    'myelofed server start' runs with it): forwards Flower's Fleet API, refuses the rest."""
    _serve_gateway(host, port, superlink_port, _server_tls(secrets, insecure))


def _flwr(args: list[str], state: Path, what: str) -> dict[str, Any]:
    """Run ``flwr <args> --format json`` against this coordinator's SuperLink; its JSON."""
    env = flower_env(state.resolve() / "flwr-home")
    done = subprocess.run(["flwr", *args, "--format", "json"], env=env, capture_output=True,
                          text=True)
    found = re.findall(r"\{.*\}", done.stdout, flags=re.DOTALL)
    try:
        answer = json.loads(found[-1]) if found else {}
    except json.JSONDecodeError:
        answer = {}
    if done.returncode != 0 or not answer.get("success"):
        console.print(f"[bold red]error:[/] {what} failed: "
                      f"{(done.stdout + done.stderr).strip()[-1500:]}", highlight=False)
        raise typer.Exit(ExitCode.INTERNAL)
    return answer


@app.command("register")
def server_register(
    public_key: Annotated[Path, typer.Argument(help="A site's .pub file ('myelofed site keys').")],
    site: Annotated[str, typer.Option(help="The site's name (its site config's site_name).")],
    state: Annotated[Path, typer.Option(help="As given to 'myelofed server start'.")
                     ] = Path("coordinator-state"),
) -> None:
    """Let a site's SuperNode join: register its public key at the running SuperLink, and
    record the site's name with its node ID in the coordinator's registry (<state>/sites.json),
    which names the site in the study's log, exclusions and report."""
    need(public_key)
    registry = registry_path(state)
    try:
        check_new(registry, site, public_key)
    except ConfigError as exc:
        fail_config(exc)
    answer = _flwr(["supernode", "register", str(public_key), CONNECTION, "--name", site],
                   state, f"registering {site}")
    node_id = int(answer["node-id"])
    record(registry, site, node_id, public_key)
    out.print(f"registered {site}: node {node_id} (key {public_key})")


@app.command("sites")
def server_sites(
    state: Annotated[Path, typer.Option(help="As given to 'myelofed server start'.")
                     ] = Path("coordinator-state"),
    unregister: Annotated[str | None, typer.Option(
        help="Unregister this site (by name): its SuperNode is refused from now on, and "
        "stopped if it runs.")] = None,
) -> None:
    """The registered sites: name, node ID, Flower's status, when each was last online; or
    unregister one by name."""
    registry = registry_path(state)
    try:
        sites = load_registry(registry)
        if unregister is not None:
            site = registered(registry, unregister)
            _flwr(["supernode", "unregister", str(site.node_id), CONNECTION], state,
                  f"unregistering {unregister}")
            remove(registry, unregister)
            out.print(f"unregistered {unregister} (node {site.node_id})")
            return
    except ConfigError as exc:
        fail_config(exc)
    nodes = {int(n["node-id"]): n for n in _flwr(["supernode", "list", CONNECTION], state,
                                                   "listing the SuperNodes")["nodes"]}
    table = Table("site", "node ID", "status", "online since", "offline since", "registered")
    for site in sorted(sites.values(), key=lambda s: s.name):
        node = nodes.pop(site.node_id, {})
        table.add_row(site.name, str(site.node_id), node.get("status", "not at the SuperLink"),
                      node.get("online-at", ""), node.get("offline-at", ""), site.registered_at)
    for node_id, node in sorted(nodes.items()):  # registered outside 'myelofed server register'
        table.add_row("(not in the registry)", str(node_id), node.get("status", ""),
                      node.get("online-at", ""), node.get("offline-at", ""),
                      node.get("created-at", ""))
    out.print(table)


def report(
    study_dir: Annotated[Path, typer.Argument(help="A study's output folder (the one holding "
                                              "handshake.json, model.json, ...).")],
) -> None:
    """Render the multicentre report again from a study's JSON files.

    Writes report.html (self-contained: opens offline), report.json and report.csv (one row per
    site, feature set, model and metric) into the folder, and prints their paths."""
    from server.report import write_report  # deferred: heavy (see cli/__init__.py)

    try:
        paths = write_report(study_dir)
    except ConfigError as exc:
        fail_config(exc)
    for kind, path in paths.items():
        out.print(f"{kind}: {path}")
