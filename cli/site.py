"""``myelofed site``: what a hospital runs on its own data. Nothing patient-level leaves it:
``check`` and ``extract`` write to the site's own folder, ``join`` runs its SuperNode."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.progress import Progress, TextColumn
from rich.table import Table

from cli import segment, supervise
from cli.console import Typer, console, fail_config, need, out, progress_columns
from cli.exit_codes import ExitCode
from common.errors import ConfigError, MyeloFedError
from common.provenance import atomic_write_json
from common.security import make_site_key
from server.commands import approving, flower_env, supernode_command

app = Typer(help="Commands a hospital site runs on its own data.")

ProtocolOpt = Annotated[str, typer.Option("--protocol", "-p",
                                          help="Study protocol file, or preset:NAME.")]
ManifestOpt = Annotated[Path | None, typer.Option(
    "--manifest", "-m", help="Site manifest CSV (case_id,image,mask,<label>,...).")]
SiteConfigOpt = Annotated[Path | None, typer.Option(
    "--site-config", help="Site config (TOML/YAML): site_name, manifest, work_dir, workers.")]
OutOpt = Annotated[Path | None, typer.Option(
    "--out", "-o",
    help="Output folder (default: the site config's work_dir, else ./myelofed-work/<the site "
    "name, or the manifest's folder name>).")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", "-j", min=1, help="Cases processed in parallel (default: all cores).")]
SiteNameOpt = Annotated[str | None, typer.Option(
    "--site-name", help="This site's name (default: from the site config, else 'site').")]


def _site_setup(protocol_src: str, manifest: Path | None, site_config: Path | None,
                out_dir: Path | None, workers: int | None, site_name: str | None) -> Any:
    # deferred: heavy (see cli/__init__.py)
    from client.manifest import read_manifest
    from common.protocol import load_protocol  # deferred: heavy
    from common.site_config import SiteConfig, load_site_config  # deferred: heavy

    try:
        protocol = load_protocol(protocol_src)
        if site_config is not None:
            config = load_site_config(site_config)
        else:
            if manifest is None:
                raise ConfigError("--manifest", ["give --manifest or --site-config"])
            # one folder per site by default, so checking two sites' manifests from the same
            # folder does not overwrite the first one's report
            config = SiteConfig(site_name=site_name or "site", manifest=manifest,
                                work_dir=Path("myelofed-work") / (
                                    site_name or manifest.resolve().parent.name or "site"))
        updates: dict[str, Any] = {}
        if manifest is not None:
            updates["manifest"] = manifest
        if out_dir is not None:
            updates["work_dir"] = out_dir
        if workers is not None:
            updates["workers"] = workers
        if site_name is not None:
            updates["site_name"] = site_name
        config = config.model_copy(update=updates)
        cases, problems = read_manifest(config.manifest, protocol, default_batch=config.site_name,
                                        data_root=config.data_root)
    except ConfigError as exc:
        fail_config(exc)
    return protocol, config, cases, problems


def _run_with_progress(cases: list[Any], protocol: Any,
                       mode: Literal["check", "extract", "landmarks"], config: Any,
                       cache_dir: Path | None, standard: Any = None) -> list[Any]:
    from client.pipeline import run_cases  # deferred: heavy (see cli/__init__.py)

    columns = progress_columns(TextColumn("{task.fields[skipped]} skipped"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(mode, total=len(cases), skipped=0)
        skipped = 0

        def on_done(outcome: Any) -> None:
            nonlocal skipped
            skipped += 0 if outcome.ok else 1
            progress.update(task, advance=1, skipped=skipped)

        return run_cases(cases, protocol, mode=mode, workers=config.n_workers,
                         cache_dir=cache_dir, on_done=on_done,
                         max_voxels=config.budget,
                         time_limit_s=config.case_time_limit_s, standard=standard)


def _image_standard(protocol: Any, config: Any, cases: list[Any], path: Path | None) -> Any:
    """The standard landmarks a protocol with histogram standardization extracts with: the
    file given, or this site's own from the landmarks of all its cases (None without it)."""
    histogram = protocol.standardization.histogram
    if histogram is None:
        return None
    # deferred: heavy (see cli/__init__.py)
    from client.pipeline import landmark_rows
    from harmonization.images import ImageStandard, combine_image_sums, scanner_sums

    if path is not None:
        try:
            return ImageStandard.from_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, MyeloFedError) as exc:
            fail_config(ConfigError(str(path), [f"not an image standard: {exc}"]))
    outcomes = _run_with_progress(cases, protocol, "landmarks", config, None)
    rows = [measure for _, measure in landmark_rows(cases, outcomes)]
    if not rows:
        fail_config(ConfigError("histogram standardization", ["no case gave landmarks"]))
    matching = protocol.standardization.matching
    standard = combine_image_sums({config.site_name: scanner_sums(rows, 1)}, histogram.scale,
                                  matching is not None and matching.noise,
                                  matching is not None and matching.resolution)
    console.print(f"histogram standardization: this site's own standard from {len(rows)} "
                  "images (a federated study uses the study's)")
    return standard


def _print_report(report: dict[str, Any], report_path: Path) -> None:
    skipped = [c for c in report["cases"] if c["status"] == "skipped"]
    if skipped:
        table = Table("row", "case", "reason", "detail", title="Skipped cases", show_lines=False)
        for c in skipped:
            table.add_row(str(c["row"]), c["case_id"], c["reason"], c["detail"])
        console.print(table)
    counts = report["counts"]
    console.print(f"{counts['usable']} of {counts['total']} cases usable, {counts['skipped']} "
                  f"skipped; protocol hash {report['protocol_hash'][:12]}; report: {report_path}")


def _exit_code(report: dict[str, Any]) -> ExitCode:
    counts = report["counts"]
    if counts["usable"] == 0:
        return ExitCode.NO_USABLE_CASE
    return ExitCode.CASES_SKIPPED if counts["skipped"] else ExitCode.OK


@app.command("check")
def site_check(protocol: ProtocolOpt, manifest: ManifestOpt = None,
               site_config: SiteConfigOpt = None, out_dir: OutOpt = None,
               workers: WorkersOpt = None, site_name: SiteNameOpt = None) -> None:
    """Validate every case without extracting: files readable, DICOM series and ROI found, mask
    matches the image, ROI large enough, label and covariates valid, ids unique. Writes
    ingestion_report.json in the output folder and prints the skipped cases."""
    from client.pipeline import ingestion_report  # deferred: heavy (see cli/__init__.py)

    proto, config, cases, problems = _site_setup(protocol, manifest, site_config, out_dir,
                                                 workers, site_name)
    outcomes = _run_with_progress(cases, proto, "check", config, None)
    report = ingestion_report(outcomes, problems, proto, config.site_name, "check")
    path = config.work_dir / "ingestion_report.json"
    atomic_write_json(path, report)
    _print_report(report, path)
    raise typer.Exit(_exit_code(report))


@app.command("extract")
def site_extract(protocol: ProtocolOpt, manifest: ManifestOpt = None,
                 site_config: SiteConfigOpt = None, out_dir: OutOpt = None,
                 workers: WorkersOpt = None, site_name: SiteNameOpt = None,
                 no_cache: Annotated[bool, typer.Option(
                     "--no-cache", help="Recompute every case (the cache is still refreshed "
                     "only when this is off).")] = False,
                 image_standard: Annotated[Path | None, typer.Option(
                     help="With histogram standardization: the study's standard landmarks "
                     "(image_standard.json in the site's study folder after a federated "
                     "preparation). Default: this site's own, from all its images.")] = None,
                 ) -> None:
    """Standardize every valid case and extract its radiomic features under the protocol.

    Writes features.parquet (case_id, batch, label, covariates, features; protocol hash and
    software versions in its metadata) and ingestion_report.json. Finished cases are cached, so
    an interrupted run resumes where it stopped."""
    # deferred: heavy (see cli/__init__.py)
    from client.pipeline import features_table, ingestion_report, write_features_table

    proto, config, cases, problems = _site_setup(protocol, manifest, site_config, out_dir,
                                                 workers, site_name)
    cache_dir = None if no_cache else config.cache_dir
    standard = _image_standard(proto, config, cases, image_standard)
    outcomes = _run_with_progress(cases, proto, "extract", config, cache_dir, standard)
    report = ingestion_report(outcomes, problems, proto, config.site_name, "extract")
    report_path = config.work_dir / "ingestion_report.json"
    atomic_write_json(report_path, report)
    table = features_table(cases, outcomes, proto)
    if table.num_rows:
        table_path = config.work_dir / "features.parquet"
        write_features_table(table, table_path, proto, config.site_name, standard)
        n_features = table.num_columns - 3 - len(proto.covariates.columns)
        console.print(f"features: {table_path} ({table.num_rows} cases x {n_features} features)")
    _print_report(report, report_path)
    raise typer.Exit(_exit_code(report))


app.command("train-segmenter")(segment.train_segmenter)
app.command("segment")(segment.segment)


@app.command("join")
def site_join(
    superlink: Annotated[str, typer.Option(help="The coordinator's host:port.")],
    site_config: Annotated[Path, typer.Option(help="This site's config (site_name, manifest, "
                                              "work_dir).")],
    ca: Annotated[Path | None, typer.Option(help="The study CA from the coordinator "
                                               "(ca.crt).")] = None,
    key: Annotated[Path | None, typer.Option(help="This site's private key ('myelofed site "
                                                "keys').")] = None,
    port: Annotated[int, typer.Option(help="The SuperNode's local port (its ClientApps "
                                      "only).")] = 9094,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Plaintext, no authentication: loopback tests only.")] = False,
    allow_any_app: Annotated[bool, typer.Option(
        "--allow-any-app", help="Run whatever app the coordinator sends, without the site "
        "config's approved_apps: tests only.")] = False,
) -> None:
    """Join the study: start this site's SuperNode, over TLS with its key (one outgoing
    connection to the coordinator; nothing listens outside this machine).

    \b
    The SuperNode runs only the study apps listed in the site config's approved_apps (their
    SHA-256, 'myelofed app-hash'): a run of any other app is refused before its code runs,
    with a log line here and the reason sent to the coordinator."""
    from common.site_config import load_site_config  # deferred: heavy (see cli/__init__.py)

    need(site_config)
    root_certificates = auth_private_key = None  # insecure: plaintext, no node authentication
    if not insecure:
        if ca is None or key is None:
            fail_config(ConfigError("site join", ["--ca and --key are needed (or --insecure "
                                                  "for a loopback test)"]))
        need(ca, key)
        root_certificates, auth_private_key = ca.resolve(), key.resolve()
    elif key is not None:
        fail_config(ConfigError("--key", ["a key needs TLS: leave out --insecure"]))
    try:
        config = load_site_config(site_config)
    except ConfigError as exc:
        fail_config(exc)
    if not config.approved_apps and not allow_any_app:
        fail_config(ConfigError(str(site_config), [
            "approved_apps: empty; list the SHA-256 of the study app the coordinator announced "
            "(check it with 'myelofed app-hash <the app folder>'), or pass --allow-any-app for "
            "a test"]))
    command = supernode_command(
        superlink=superlink, port=port, root_certificates=root_certificates,
        auth_private_key=auth_private_key,
        node_config={"site-name": config.site_name, "site-config": str(site_config.resolve())})
    supervise.become(
        approving(command, config.site_name, None if allow_any_app else config.approved_apps,
                  site_config.resolve()),
        flower_env(config.work_dir / "flwr-home"))


@app.command("keys")
def site_keys(
    site: Annotated[str, typer.Option(help="This site's name (as in its site config).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the key pair goes.")
                       ] = Path("site-secrets"),
) -> None:
    """Make this site's SuperNode key pair (ECDSA P-384, OpenSSH format).

    \b
    The private key stays here (owner-readable only); send the .pub file to the coordinator,
    who registers it (flwr supernode register): the SuperLink refuses any other node."""
    try:
        made = make_site_key(out_dir, site)
    except ConfigError as exc:
        fail_config(exc)
    out.print(f"private key (stays at the site): {made.private}")
    out.print(f"public key (send to the coordinator): {made.public}")
