"""``myelofed``: one command line for every role (the console script runs :func:`main`).

Exit codes (the same for every command; :class:`cli.exit_codes.ExitCode`):
0 done; 1 unexpected error (a bug: please report it); 2 unusable protocol, site config,
manifest or option (nothing processed); 3 done, but some cases were skipped (see the ingestion
report); 4 done, but no case was usable; 5 a verification (ibsi-check) found values that
disagree with the reference; 6 a federated study stopped before its end (the reason is
printed).
"""

from __future__ import annotations

import sys

from cli import coordinator, demo, protocol, site, tools
from cli.console import Typer, console
from cli.exit_codes import ExitCode, exit_codes_help
from common.errors import ConfigError

HELP = f"""MyeloFed: federated multicentre radiomics for multiple myeloma.

\b
A hospital SITE prepares its own data; nothing patient-level leaves it:
  myelofed site check   --protocol study.toml --manifest cases.csv   validate every case
  myelofed site extract --protocol study.toml --manifest cases.csv   standardize + extract features
  myelofed site keys --site NAME         this site's SuperNode key pair (send the .pub)
  myelofed site join --superlink HOST:PORT --site-config site.toml --ca ca.crt --key KEY
                                         its SuperNode: runs only the apps in approved_apps
\b
The COORDINATOR makes the study's credentials and runs the SuperLink:
  myelofed server certs --host coordinator.example.org   study CA + SuperLink certificate
  myelofed server start                  the SuperLink on loopback (TLS + node authentication)
                                         and the fleet gateway the sites reach (port 9092)
  myelofed server register site_A.pub --site site_A      let a site join
  myelofed app build -o release          release the study app: one .fab and its SHA-256
  myelofed app unpack release/X.fab -o DIR   the folder 'flwr run DIR study' ships as X.fab
  myelofed app-hash X.fab|APP_DIR        the SHA-256 a site approves (of a release or a folder)
\b
The study PROTOCOL (TOML/YAML) is written by the coordinator and is the same at every site:
  myelofed protocol presets              list ready protocols (IBSI configs, spine MRI, CT, PET)
  myelofed protocol show preset:wb_ldct  print a protocol and its content hash
  myelofed protocol validate study.toml  check a protocol file (field + reason for each error)
\b
  myelofed demo                          the whole federated study on the synthetic cohort
  myelofed report OUT/study              render the multicentre report again from its JSON
  myelofed simulate                      make the built-in synthetic 3-site cohort
  myelofed harmonize TABLE --batch-col scanner -o OUT   ComBat offline (federated halves in-process)
  myelofed ibsi-check                    verify this installation on the IBSI digital phantom
\b
The federated study itself runs on Flower (server/app.py, client/app.py): the coordinator
starts it with 'flwr run <app> study --run-config ...' (see deploy/README.md).
\b
{exit_codes_help()}"""

app = Typer(help=HELP)
app.command("simulate")(tools.simulate)
app.command("harmonize")(tools.harmonize)
app.command("demo")(demo.demo)
app.command("app-hash")(tools.app_hash_command)
app_commands = Typer(help="Release the study app (the bundle Flower ships to the sites).")
app_commands.command("build")(tools.app_build_command)
app_commands.command("unpack")(tools.app_unpack_command)
app.add_typer(app_commands, name="app")
app.command("report")(coordinator.report)
app.command("ibsi-check")(tools.ibsi_check)
app.add_typer(site.app, name="site")
app.add_typer(coordinator.app, name="server")
app.add_typer(protocol.app, name="protocol")


def main() -> None:
    try:
        app()
    except ConfigError as exc:  # pragma: no cover - commands handle their own
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(ExitCode.CONFIG)


if __name__ == "__main__":
    main()
