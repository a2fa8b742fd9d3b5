"""``myelofed``: one command line for every role.

Exit codes (the same for every command):
0 done; 1 unexpected error (a bug: please report it); 2 unusable protocol, site config,
manifest or option (nothing processed); 3 done, but some cases were skipped (see the ingestion
report); 4 done, but no case was usable; 5 a verification (ibsi-check) found values that
disagree with the reference; 6 a federated study stopped before its end (the reason is
printed).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from common.errors import ConfigError, ExitCode

HELP = """MyeloFed: federated multicentre radiomics for multiple myeloma.

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
  myelofed app-hash APP_DIR              the study app's SHA-256 (announced; sites approve it)
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
Exit codes: 0 done; 1 unexpected error; 2 unusable protocol/config/manifest; 3 done but some
cases skipped; 4 done but no usable case; 5 a verification found disagreeing values; 6 a
federated study stopped before its end."""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})
site_app = typer.Typer(help="Commands a hospital site runs on its own data.", no_args_is_help=True)
protocol_app = typer.Typer(help="Inspect and validate study protocols.", no_args_is_help=True)
server_app = typer.Typer(help="Commands the study coordinator runs.", no_args_is_help=True)
app.add_typer(site_app, name="site")
app.add_typer(server_app, name="server")
app.add_typer(protocol_app, name="protocol")

console = Console(stderr=True)
out = Console()


def _fail_config(exc: ConfigError) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(ExitCode.CONFIG)


# --- protocol ---------------------------------------------------------------------------------

@protocol_app.command("presets")
def protocol_presets() -> None:
    """List the protocols shipped with MyeloFed (use them as 'preset:NAME')."""
    from common.presets import list_presets

    table = Table("preset", "description")
    for name, text in list_presets().items():
        table.add_row(f"preset:{name}", text)
    out.print(table)


@protocol_app.command("show")
def protocol_show(
    source: Annotated[str, typer.Argument(help="A protocol file or preset:NAME.")],
) -> None:
    """Print a protocol (all defaults filled in, as JSON) and its content hash."""
    from common.protocol import load_protocol

    try:
        protocol = load_protocol(source)
    except ConfigError as exc:
        _fail_config(exc)
    out.print_json(json.dumps(protocol.model_dump(mode="json")))
    out.print(f"content hash: {protocol.content_hash()}", soft_wrap=True)


@protocol_app.command("validate")
def protocol_validate(
    source: Annotated[str, typer.Argument(help="A protocol file or preset:NAME.")],
) -> None:
    """Validate a protocol: exit 0 and print its hash, or exit 2 naming each bad field."""
    from common.protocol import load_protocol

    try:
        protocol = load_protocol(source)
    except ConfigError as exc:
        _fail_config(exc)
    out.print(f"{source}: valid protocol '{protocol.name}', hash {protocol.content_hash()}",
              soft_wrap=True)


# --- site -------------------------------------------------------------------------------------

ProtocolOpt = Annotated[str, typer.Option("--protocol", "-p",
                                          help="Study protocol file, or preset:NAME.")]
ManifestOpt = Annotated[Optional[Path], typer.Option(
    "--manifest", "-m", help="Site manifest CSV (case_id,image,mask,<label>,...).")]
SiteConfigOpt = Annotated[Optional[Path], typer.Option(
    "--site-config", help="Site config (TOML/YAML): site_name, manifest, work_dir, workers.")]
OutOpt = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help="Output folder (default: the site config's work_dir, else ./myelofed-work).")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", "-j", min=1, help="Cases processed in parallel (default: all cores).")]
SiteNameOpt = Annotated[Optional[str], typer.Option(
    "--site-name", help="This site's name (default: from the site config, else 'site').")]


def _site_setup(protocol_src: str, manifest: Path | None, site_config: Path | None,
                out_dir: Path | None, workers: int | None, site_name: str | None) -> Any:
    from client.manifest import read_manifest
    from common.protocol import load_protocol
    from common.site_config import SiteConfig, load_site_config

    try:
        protocol = load_protocol(protocol_src)
        if site_config is not None:
            config = load_site_config(site_config)
        else:
            if manifest is None:
                raise ConfigError("--manifest", ["give --manifest or --site-config"])
            config = SiteConfig(site_name=site_name or "site", manifest=manifest)
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
        cases, problems = read_manifest(config.manifest, protocol, default_batch=config.site_name)
    except ConfigError as exc:
        _fail_config(exc)
    return protocol, config, cases, problems


def _run_with_progress(cases: list, protocol: Any, mode: str, workers: int,
                       cache_dir: Path | None) -> list:
    from client.pipeline import run_cases

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[skipped]} skipped"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(mode, total=len(cases), skipped=0)
        skipped = 0

        def on_done(outcome: Any) -> None:
            nonlocal skipped
            skipped += 0 if outcome.ok else 1
            progress.update(task, advance=1, skipped=skipped)

        return run_cases(cases, protocol, mode=mode, workers=workers, cache_dir=cache_dir,
                         on_done=on_done)


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


@site_app.command("check")
def site_check(protocol: ProtocolOpt, manifest: ManifestOpt = None,
               site_config: SiteConfigOpt = None, out_dir: OutOpt = None,
               workers: WorkersOpt = None, site_name: SiteNameOpt = None) -> None:
    """Validate every case without extracting: files readable, DICOM series and ROI found, mask
    matches the image, ROI large enough, label and covariates valid, ids unique. Writes
    ingestion_report.json in the output folder and prints the skipped cases."""
    from client.pipeline import ingestion_report
    from common.provenance import atomic_write_json

    proto, config, cases, problems = _site_setup(protocol, manifest, site_config, out_dir,
                                                 workers, site_name)
    outcomes = _run_with_progress(cases, proto, "check", config.n_workers, None)
    report = ingestion_report(outcomes, problems, proto, config.site_name, "check")
    path = config.work_dir / "ingestion_report.json"
    atomic_write_json(path, report)
    _print_report(report, path)
    raise typer.Exit(_exit_code(report))


@site_app.command("extract")
def site_extract(protocol: ProtocolOpt, manifest: ManifestOpt = None,
                 site_config: SiteConfigOpt = None, out_dir: OutOpt = None,
                 workers: WorkersOpt = None, site_name: SiteNameOpt = None,
                 no_cache: Annotated[bool, typer.Option(
                     "--no-cache", help="Recompute every case (the cache is still refreshed "
                     "only when this is off).")] = False) -> None:
    """Standardize every valid case and extract its radiomic features under the protocol.

    Writes features.parquet (case_id, batch, label, covariates, features; protocol hash and
    software versions in its metadata) and ingestion_report.json. Finished cases are cached, so
    an interrupted run resumes where it stopped."""
    from client.pipeline import features_table, ingestion_report, write_features_table
    from common.provenance import atomic_write_json

    proto, config, cases, problems = _site_setup(protocol, manifest, site_config, out_dir,
                                                 workers, site_name)
    cache_dir = None if no_cache else config.cache_dir
    outcomes = _run_with_progress(cases, proto, "extract", config.n_workers, cache_dir)
    report = ingestion_report(outcomes, problems, proto, config.site_name, "extract")
    report_path = config.work_dir / "ingestion_report.json"
    atomic_write_json(report_path, report)
    table = features_table(cases, outcomes, proto)
    if table.num_rows:
        table_path = config.work_dir / "features.parquet"
        write_features_table(table, table_path, proto, config.site_name)
        n_features = table.num_columns - 3 - len(proto.covariates.columns)
        console.print(f"features: {table_path} ({table.num_rows} cases x {n_features} features)")
    _print_report(report, report_path)
    raise typer.Exit(_exit_code(report))


# --- synthetic cohort -------------------------------------------------------------------------

@app.command("simulate")
def simulate(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where to write the cohort.")
                       ] = Path("synthetic-cohort"),
    sites: Annotated[Optional[int], typer.Option(
        min=1, help="Number of sites (default: as many as --patients gives, else 3).")] = None,
    patients: Annotated[Optional[str], typer.Option(
        help="Patients per site, comma-separated (40,70,110), or one number for every site. "
        "Default 40,70,110 (repeated for more sites).")] = None,
    task: Annotated[str, typer.Option(
        help="diagnosis (MM vs metastasis), pci (plasma-cell infiltration), response "
        "(with ISS stage) or mrd (after-treatment scans).")] = "diagnosis",
    modality: Annotated[str, typer.Option(help="MR (T1-weighted-like) or CT (HU).")] = "MR",
    file_format: Annotated[str, typer.Option(
        "--format", help="nifti, dicom (series + SEG) or both.")] = "nifti",
    seed: Annotated[int, typer.Option(help="Same seed, same cohort.")] = 0,
    scanner_effects: Annotated[bool, typer.Option(
        "--scanner-effects/--no-scanner-effects",
        help="Per-site spacing, intensity scale and response, bias field, noise and blur.")
    ] = True,
    workers: WorkersOpt = None,
) -> None:
    """Make the built-in synthetic multi-site myeloma cohort.

    Spine phantoms with the MM marrow patterns (normal, focal, diffuse, mixed, salt-and-pepper)
    and metastases, labels for the four tasks, clinical covariates (age, sex, ISS stage) and
    per-site scanner effects; deterministic for a seed.

    \b
    Writes, under --out:
      <site>/manifest.csv        the site manifest (manifest_dicom.csv too with --format both)
      <site>/images, masks/      NIfTI images and label maps (1 = marrow ROI, 2 = muscle)
      <site>/dicom/<case>/       DICOM series (image/) and a SEG (seg.dcm)
      study.yaml                 a study protocol for this task and modality
      preview.png                sample slices per site and pattern
      cohort.json                the generator's settings (written last)
    \b
    Then, for example:
      myelofed site extract -p <out>/study.yaml -m <out>/site_A/manifest.csv -o work/site_A"""
    from common.synthetic import CohortSpec, Task, make_sites, preview_png, write_cohort

    try:
        sizes = _cohort_sizes(sites, patients)
        try:
            the_task = Task(task)
        except ValueError:
            raise ConfigError("--task", [f"'{task}' is not one of "
                                         f"{', '.join(t.value for t in Task)}"]) from None
        if modality not in ("MR", "CT"):
            raise ConfigError("--modality", [f"'{modality}' is not MR or CT"])
        if file_format not in ("nifti", "dicom", "both"):
            raise ConfigError("--format", [f"'{file_format}' is not nifti, dicom or both"])
    except ConfigError as exc:
        _fail_config(exc)
    spec = CohortSpec(make_sites(sizes, scanner_effects, seed), the_task, modality, seed,
                      scanner_effects, file_format)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("simulate", total=sum(sizes))
        manifests = write_cohort(out_dir, spec, workers=workers,
                                 on_case=lambda _: progress.advance(bar))
    preview = out_dir / "preview.png"
    preview_png(preview, spec)
    for site, manifest in manifests.items():
        out.print(f"{site}: {manifest}")
    out.print(f"study protocol: {out_dir / 'study.yaml'}")
    out.print(f"preview: {preview}")


def _cohort_sizes(sites: int | None, patients: str | None) -> tuple[int, ...]:
    """Patients per site from --sites and --patients (ConfigError naming the option)."""
    if patients is None:
        n = sites or 3
        return tuple((40, 70, 110)[i % 3] for i in range(n))
    try:
        sizes = tuple(int(v) for v in patients.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ConfigError("--patients", [f"'{patients}' is not a list of positive integers, "
                                         "e.g. 40,70,110"])
    if len(sizes) == 1 and sites is not None:
        return sizes * sites
    if sites is not None and sites != len(sizes):
        raise ConfigError("--patients", [f"gives {len(sizes)} sites but --sites is {sites}"])
    return sizes


# --- harmonization ----------------------------------------------------------------------------

@app.command("harmonize")
def harmonize(
    table: Annotated[Path, typer.Argument(help="Features table: .csv or .parquet, one row a case.")],
    batch_col: Annotated[str, typer.Option(help="Column naming the batch (the scanner).")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Harmonized table (.csv or "
                                            ".parquet); a .json report is written beside it.")],
    categorical: Annotated[Optional[list[str]], typer.Option(
        help="Categorical covariate to preserve (repeat the option for several).")] = None,
    continuous: Annotated[Optional[list[str]], typer.Option(
        help="Continuous covariate to preserve (repeat for several).")] = None,
    site_col: Annotated[Optional[str], typer.Option(
        help="Column naming the site: its rows go through one site half (default: each batch "
        "is a site).")] = None,
    ref_batch: Annotated[Optional[str], typer.Option(
        help="Reference batch: its rows stay as they are, the others move to it.")] = None,
    nonparametric: Annotated[bool, typer.Option(help="Non-parametric empirical Bayes.")] = False,
    mean_only: Annotated[bool, typer.Option(help="Adjust location only, not scale.")] = False,
    no_eb: Annotated[bool, typer.Option("--no-eb", help="Plain batch estimates, no EB.")] = False,
    min_batch_size: Annotated[int, typer.Option(min=2, help="Smallest batch accepted.")] = 10,
    min_cell: Annotated[int, typer.Option(
        min=1, help="Smallest count of patients behind any sum a site sends.")] = 5,
    exclude: Annotated[Optional[list[str]], typer.Option(
        help="Numeric column that is not a feature, e.g. the label (repeat for several; a "
        "MyeloFed features.parquet names its label column itself).")] = None,
) -> None:
    """Harmonize a features table with ComBat, offline: the site halves run per site and the
    server halves in-process, the same code the federated study runs. Feature columns are the
    numeric columns other than the batch, site, covariate, case_id, label and --exclude columns.

    \b
    Preserve only covariates known for every new patient (age, sex, stage): a covariate such as
    the outcome label would be needed to harmonize a new case.
    \b
    Example:
      myelofed harmonize work/features.parquet --batch-col batch --categorical sex \\
        --continuous age -o work/features_combat.parquet"""
    import numpy as np
    import pandas as pd

    from common.errors import HarmonizationError
    from common.provenance import atomic_write_bytes, atomic_write_json
    from harmonization.combat import CombatOptions, Design, SiteTable, fit_combat
    from harmonization.diagnostics import site_effect, site_effect_png

    categorical, continuous = list(categorical or []), list(continuous or [])
    try:
        frame = _read_table(table)
        named = [batch_col, *categorical, *continuous] + ([site_col] if site_col else [])
        labels = _label_columns(table)
        not_features = set(named) | set(exclude or []) | {"case_id"} | labels
        for column in sorted(labels & {*categorical, *continuous}):
            console.print(f"[yellow]warning:[/] the label '{column}' is preserved as a covariate: "
                          "harmonizing a new case will need its label (research use only)")
        missing = [c for c in named if c not in frame.columns]
        if missing:
            raise ConfigError(str(table), [f"no column '{c}'" for c in missing])
        incomplete = [c for c in named if frame[c].isna().any()]
        if incomplete:
            raise ConfigError(str(table), [f"column '{c}' has empty values" for c in incomplete])
        features = [c for c in frame.columns if c not in not_features
                    and pd.api.types.is_numeric_dtype(frame[c])]
        if not features:
            raise ConfigError(str(table), ["no numeric feature column"])
        unusable = [c for c in features if not np.all(np.isfinite(frame[c].to_numpy(float)))]
        if unusable:
            raise ConfigError(str(table), [f"feature '{c}' has missing or infinite values"
                                           for c in unusable[:5]])
    except ConfigError as exc:
        _fail_config(exc)
    batch = frame[batch_col].astype(str).tolist()
    covariates = {c: frame[c].tolist() for c in (*categorical, *continuous)}
    options = CombatOptions(eb=not no_eb, parametric=not nonparametric, mean_only=mean_only,
                            ref_batch=ref_batch, min_batch_size=min_batch_size,
                            min_cell=min_cell)
    groups = frame.groupby(site_col if site_col else batch_col, sort=True).indices
    y = frame[features].to_numpy(float)
    try:
        design = Design.from_values(batch, covariates, categorical, continuous, ref_batch)
        sites = [SiteTable(str(name), y[rows], [batch[i] for i in rows],
                           {c: [v[i] for i in rows] for c, v in covariates.items()})
                 for name, rows in groups.items()]
        model = fit_combat(sites, design, options)
        harmonized = model.transform(y, batch, covariates)
    except HarmonizationError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(ExitCode.CONFIG) from None
    # Site effect beyond the preserved covariates, before and after.
    covariate_part = design.matrix(batch, covariates)[:, design.n_batch:] @ model.beta[
        design.n_batch:]
    before = site_effect(y - covariate_part, batch)
    after = site_effect(harmonized - covariate_part, batch)
    result = frame.copy()
    result[features] = harmonized
    _write_table(result, out_path)
    report = {
        "input": str(table), "output": str(out_path), "rows": len(frame),
        "features": len(features), "batches": list(design.batches),
        "sites": sorted(str(k) for k in groups), "categorical": categorical,
        "continuous": continuous,
        "options": {"eb": options.eb, "parametric": options.parametric,
                    "mean_only": options.mean_only, "ref_batch": options.ref_batch,
                    "min_batch_size": min_batch_size, "min_cell": min_cell},
        "site_effect": {"test": "Kruskal-Wallis across batches of the features less the "
                        "preserved covariates' effects", "alpha": before.alpha,
                        "share_significant_before": before.share_significant,
                        "share_significant_after": after.share_significant},
    }
    report_path, plot_path = out_path.with_suffix(".json"), out_path.with_suffix(".png")
    atomic_write_bytes(plot_path, site_effect_png(y - covariate_part, harmonized - covariate_part,
                                                  batch, features, before))
    report["plot"] = str(plot_path)
    atomic_write_json(report_path, report)
    out.print(f"{len(frame)} rows x {len(features)} features, {design.n_batch} batches, "
              f"{len(groups)} site(s); features with a site effect (Kruskal-Wallis p < 0.05): "
              f"{before.share_significant:.0%} before, {after.share_significant:.0%} after")
    out.print(f"harmonized: {out_path}\nreport: {report_path}\nplot: {plot_path}")


def _label_columns(path: Path) -> set[str]:
    """The label column named in a MyeloFed features table's metadata (none for other files)."""
    if path.suffix.lower() != ".parquet" or not path.is_file():
        return set()
    from client.pipeline import read_features_metadata

    try:
        return {read_features_metadata(path)["protocol"]["task"]["label_column"]}
    except Exception:  # noqa: BLE001 - not a MyeloFed table: nothing to exclude
        return set()


def _read_table(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        raise ConfigError(str(path), ["file not found"])
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise many types on bad files
        raise ConfigError(str(path), [f"cannot read: {exc}"]) from None
    raise ConfigError(str(path), [f"unknown format '{path.suffix}': use .csv or .parquet"])


def _write_table(frame: Any, path: Path) -> None:
    from common.provenance import atomic_write_bytes, atomic_write_parquet

    if path.suffix.lower() == ".parquet":
        atomic_write_parquet(path, frame)
    else:
        atomic_write_bytes(path, frame.to_csv(index=False).encode("utf-8"))


# --- tools ------------------------------------------------------------------------------------

def _default_ibsi_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "ibsi"


@app.command("demo")
def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the cohort and the study "
                                          "results go.")] = Path("myelofed-demo"),
    cohort: Annotated[Optional[Path], typer.Option(
        help="A cohort made by 'myelofed simulate' (default: <out>/cohort, made if absent).")
    ] = None,
    seed: Annotated[int, typer.Option(help="The study seed (train/test split, CV folds).")] = 0,
    task: Annotated[str, typer.Option(
        help="The cohort's task: diagnosis (MM vs metastasis), response (with the ISS "
        "nomogram), pci (plasma-cell infiltration, a regression) or mrd.")] = "diagnosis",
) -> None:
    """Run the whole federated study on the built-in synthetic cohort, on this machine.

    Makes the default three-site cohort if absent, then runs the study in Flower's simulation
    engine, one virtual SuperNode per site: handshake, local preparation, federated ComBat and
    the radiomics model (screening + LASSO chosen by federated cross-validation) on raw and on
    harmonized features, with every site left out once, then the 3D CNN over Flower rounds.
    Ends with a table per site: the test AUC of its local-only model, the federated model, the
    federated model after ComBat, the model trained without the site (leave-site-out, the
    external validation) and the federated CNN; with --task response, the nomogram (radiomics
    score + ISS stage + age) too; with --task pci, Pearson r instead of the AUC.

    \b
    Writes, under --out:
      cohort/            the synthetic cohort (cohort-<task>/ for another task; or --cohort)
      study/             handshake.json prepare.json combat.json model.json cnn.json
                         study.json (nomogram.json with --task response),
                         cnn/global_round_NNN.npz (a checkpoint per round),
                         report.html report.json report.csv (the multicentre report)
      cohort/work/<site>/study/<hash>/report/site_report.html
                         each site's own report (it stays at the site)"""
    from common.protocol import load_protocol
    from common.synthetic import CohortSpec, Task, make_sites, read_cohort_spec, write_cohort
    from server.app import run_in_simulation
    from server.study import StudySettings, StudyStopped, summary_rows

    try:
        the_task = Task(task)
    except ValueError:
        _fail_config(ConfigError("--task", [f"'{task}' is not one of "
                                            f"{', '.join(t.value for t in Task)}"]))
    cohort = cohort or out_dir / ("cohort" if the_task is Task.DIAGNOSIS else f"cohort-{task}")
    existing = read_cohort_spec(cohort)
    if existing is not None and existing.get("task") != the_task.value:
        _fail_config(ConfigError(str(cohort), [f"a cohort for the task '{existing.get('task')}'"
                                               f", not '{task}'"]))
    if existing is None:
        if (cohort / "study.yaml").exists() or any(cohort.glob("*/manifest.csv")):
            console.print(f"{cohort}: an incomplete cohort (no cohort.json): it is made again")
        spec = CohortSpec(make_sites(_cohort_sizes(None, None), True, 0), the_task)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console) as progress:
            bar = progress.add_task("synthetic cohort", total=sum(_cohort_sizes(None, None)))
            write_cohort(cohort, spec, on_case=lambda _: progress.advance(bar))
    try:
        protocol = load_protocol(cohort / "study.yaml")
    except ConfigError as exc:
        _fail_config(exc)
    study = out_dir / "study"
    settings = StudySettings(protocol, study, min_sites=2, seed=seed)
    started = time.monotonic()
    try:
        run_in_simulation(cohort, settings,
                          lambda line: console.print(f"[{time.monotonic() - started:5.0f} s] "
                                                     f"{line}", highlight=False))
    except StudyStopped as exc:
        console.print(f"[bold red]study stopped:[/] {exc}")
        raise typer.Exit(ExitCode.STUDY_STOPPED) from None
    status = json.loads((study / "study.json").read_text())
    if status["status"] != "done":
        console.print(f"[bold red]study stopped:[/] {status['reason']}")
        raise typer.Exit(ExitCode.STUDY_STOPPED)
    read = lambda name: (json.loads((study / name).read_text())  # noqa: E731
                         if (study / name).exists() else None)
    metric, rows = summary_rows(read("model.json")["models"], read("cnn.json"),
                                read("nomogram.json"))
    table = Table("site", "test", "local", "federated", "fed. + ComBat", "left out",
                  "left out + ComBat", "nomogram", "CNN",
                  title=f"Test {metric.upper()} per site ({time.monotonic() - started:.0f} s)",
                  caption="radiomics: local-only model, federated model (raw features, after "
                  "federated ComBat), model trained without the site; the nomogram (radiomics "
                  "score + clinical factors, response task); the final federated CNN")
    show = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        table.add_row(r["site"], str(r["n_test"]), show(r["local"]), show(r["federated"]),
                      show(r["federated_combat"]), show(r["leave_site_out"]),
                      show(r["leave_site_out_combat"]), show(r["nomogram"]), show(r["cnn"]))
    out.print(table)
    out.print(f"results: {study}")
    from server.report import write_report

    paths = write_report(study)
    out.print(f"multicentre report: {paths['html']} (also {paths['json'].name}, "
              f"{paths['csv'].name})")
    for html in sorted((cohort / "work").glob(f"*/study/{protocol.short_hash}/report/"
                                              "site_report.html")):
        out.print(f"site report ({html.parts[-5]}, stays at the site): {html}")


@server_app.command("certs")
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
    from common.security import make_server_credentials

    try:
        made = make_server_credentials(out_dir, host, study)
    except ConfigError as exc:
        _fail_config(exc)
    out.print(f"study CA (give to every site): {made.ca_cert}")
    out.print(f"SuperLink certificate and key (keep here): {made.cert}, {made.key}")


#: The name of the coordinator's own connection to its SuperLink in its FLWR_HOME.
CONNECTION = "study"


def _exec(command: list[str], env: dict[str, str]) -> None:
    """Become the Flower process (for systemd and containers: signals reach it directly)."""
    import os
    import shutil

    if shutil.which(command[0], path=env.get("PATH")) is None:
        _fail_config(ConfigError(command[0], ["not found: install myelofed (it brings flwr)"]))
    sys.stdout.flush()
    os.execvpe(command[0], command, env)


def _need(*paths: Path) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        _fail_config(ConfigError(str(missing[0]), ["not found"]))


@server_app.command("start")
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
    """Start the coordinator: the SuperLink on loopback, and the fleet gateway that alone
    faces the sites.

    \b
    The SuperLink runs with TLS and SuperNode authentication (only keys registered with
    'myelofed server register' may join), its state on disk and no runtime installs. It listens
    on 127.0.0.1:<control-port>, because Flower serves its unauthenticated Control API (start
    runs, register nodes) on the same port as the sites' Fleet API. The gateway listens on
    <host>:<port> with the same certificate and forwards only the Fleet API to it (see
    server/gateway.py). Also writes the coordinator's connection ('study', to the loopback
    port) to <state>/flwr-home, which 'myelofed server register' and 'flwr run <app> study'
    use. Stops both on SIGINT/SIGTERM, or when the SuperLink exits."""
    import asyncio
    import subprocess

    from server.launch import (
        LOOPBACK,
        flower_env,
        port_open,
        superlink_command,
        write_connection,
    )

    tls = _server_tls(secrets, insecure)
    state = state.resolve()
    home = state / "flwr-home"
    write_connection(home, CONNECTION, f"{LOOPBACK}:{control_port}",
                     root_certificates=None if tls is None else tls.ca_certfile.resolve())
    command = superlink_command(port=control_port, tls=tls, host=LOOPBACK,
                                database=state / "superlink.db", supernode_auth=tls is not None)
    superlink = subprocess.Popen(command, env=flower_env(home), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not port_open(LOOPBACK, control_port):
            if superlink.poll() is not None or time.monotonic() > deadline:
                console.print(f"[bold red]error:[/] the SuperLink did not start on "
                              f"{LOOPBACK}:{control_port} (exit {superlink.poll()})")
                raise typer.Exit(1)
            time.sleep(0.2)

        async def superlink_exited() -> None:
            while superlink.poll() is None:
                await asyncio.sleep(0.5)
            console.print(f"[bold red]the SuperLink exited with {superlink.returncode}[/]")

        _serve_gateway(host, port, control_port, tls, watch=superlink_exited)
    finally:
        if superlink.poll() is None:
            superlink.terminate()
            try:
                superlink.wait(timeout=15)
            except subprocess.TimeoutExpired:
                superlink.kill()
    if superlink.returncode not in (0, -15, None):
        raise typer.Exit(1)


def _server_tls(secrets: Path, insecure: bool):  # noqa: ANN202 - server.launch.ServerTls
    """The coordinator's TLS files from ``secrets`` (each checked), or None when insecure."""
    from server.launch import ServerTls

    if insecure:
        return None
    tls = ServerTls(secrets / "ca.crt", secrets / "server.pem", secrets / "server.key")
    _need(tls.ca_certfile, tls.certfile, tls.keyfile)
    return tls


def _serve_gateway(host: str, port: int, superlink_port: int, tls,  # noqa: ANN001
                   watch=None) -> None:  # noqa: ANN001
    """The fleet gateway on ``host:port`` with the SuperLink's certificate (``tls``; None:
    plaintext) in front of the SuperLink on loopback, until stopped or ``watch`` returns."""
    from server.gateway import Listen, Upstream, serve
    from server.launch import LOOPBACK

    if tls is None:
        serve(Listen(host, port), Upstream(LOOPBACK, superlink_port, None), watch=watch)
    else:
        serve(Listen(host, port, tls.certfile, tls.keyfile),
              Upstream(LOOPBACK, superlink_port, tls.ca_certfile), watch=watch)


@server_app.command("gateway")
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


@server_app.command("register")
def server_register(
    public_key: Annotated[Path, typer.Argument(help="A site's .pub file ('myelofed site keys').")],
    site: Annotated[str, typer.Option(help="The site's name.")],
    state: Annotated[Path, typer.Option(help="As given to 'myelofed server start'.")
                     ] = Path("coordinator-state"),
) -> None:
    """Let a site's SuperNode join: register its public key at the running SuperLink."""
    import subprocess

    from server.launch import flower_env

    _need(public_key)
    env = flower_env(state.resolve() / "flwr-home")
    done = subprocess.run(["flwr", "supernode", "register", str(public_key), CONNECTION,
                           "--name", site], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        console.print(f"[bold red]error:[/] registering {site} failed: "
                      f"{(done.stdout + done.stderr).strip()[-1500:]}", highlight=False)
        raise typer.Exit(1)
    out.print(f"registered {site} ({public_key})")


@site_app.command("join")
def site_join(
    superlink: Annotated[str, typer.Option(help="The coordinator's host:port.")],
    site_config: Annotated[Path, typer.Option(help="This site's config (site_name, manifest, "
                                              "work_dir).")],
    ca: Annotated[Optional[Path], typer.Option(help="The study CA from the coordinator "
                                               "(ca.crt).")] = None,
    key: Annotated[Optional[Path], typer.Option(help="This site's private key ('myelofed site "
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
    from common.site_config import load_site_config
    from server.launch import approving, flower_env, supernode_command

    _need(site_config)
    if not insecure:
        if ca is None or key is None:
            _fail_config(ConfigError("site join", ["--ca and --key are needed (or --insecure "
                                                   "for a loopback test)"]))
        _need(ca, key)
    elif key is not None:
        _fail_config(ConfigError("--key", ["a key needs TLS: leave out --insecure"]))
    try:
        config = load_site_config(site_config)
    except ConfigError as exc:
        _fail_config(exc)
    if not config.approved_apps and not allow_any_app:
        _fail_config(ConfigError(str(site_config), [
            "approved_apps: empty; list the SHA-256 of the study app the coordinator announced "
            "(check it with 'myelofed app-hash <the app folder>'), or pass --allow-any-app for "
            "a test"]))
    command = supernode_command(
        superlink=superlink, port=port, root_certificates=None if insecure else ca.resolve(),
        auth_private_key=None if insecure else key.resolve(),
        node_config={"site-name": config.site_name, "site-config": str(site_config.resolve())})
    _exec(approving(command, config.site_name, None if allow_any_app else config.approved_apps),
          flower_env(config.work_dir / "flwr-home"))


@site_app.command("keys")
def site_keys(
    site: Annotated[str, typer.Option(help="This site's name (as in its site config).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the key pair goes.")
                       ] = Path("site-secrets"),
) -> None:
    """Make this site's SuperNode key pair (ECDSA P-384, OpenSSH format).

    \b
    The private key stays here (owner-readable only); send the .pub file to the coordinator,
    who registers it (flwr supernode register): the SuperLink refuses any other node."""
    from common.security import make_site_key

    try:
        made = make_site_key(out_dir, site)
    except ConfigError as exc:
        _fail_config(exc)
    out.print(f"private key (stays at the site): {made.private}")
    out.print(f"public key (send to the coordinator): {made.public}")


@app.command("app-hash")
def app_hash_command(
    app_dir: Annotated[Path, typer.Argument(help="The app folder (with its pyproject.toml), as "
                                            "'flwr run' is given it.")] = Path("."),
) -> None:
    """Print the SHA-256 of the app bundle 'flwr run' makes of APP_DIR: the coordinator
    announces it with the study, each site puts it in its config's approved_apps."""
    from client.supernode import app_hash

    if not (app_dir / "pyproject.toml").is_file():
        _fail_config(ConfigError(str(app_dir), ["no pyproject.toml: not a Flower app folder"]))
    out.print(app_hash(app_dir))


@app.command("report")
def report(
    study_dir: Annotated[Path, typer.Argument(help="A study's output folder (the one holding "
                                              "handshake.json, model.json, ...).")],
) -> None:
    """Render the multicentre report again from a study's JSON files.

    Writes report.html (self-contained: opens offline), report.json and report.csv (one row per
    site, feature set, model and metric) into the folder, and prints their paths."""
    from server.report import write_report

    try:
        paths = write_report(study_dir)
    except ConfigError as exc:
        _fail_config(exc)
    for kind, path in paths.items():
        out.print(f"{kind}: {path}")


@app.command("ibsi-check")
def ibsi_check(
    data_dir: Annotated[Path, typer.Option(
        help="Folder with digital_phantom/nifti/{image,mask}/ and the reference CSV.")
    ] = _default_ibsi_dir(),
    show_all: Annotated[bool, typer.Option("--all", help="List every feature.")] = False,
) -> None:
    """Extract the IBSI-1 digital phantom with this installation and compare every feature that
    pyradiomics implements with the IBSI reference values. Exit 0 when all agree."""
    from client.ibsi import run_phantom_check

    try:
        rows = run_phantom_check(data_dir)
    except ConfigError as exc:
        _fail_config(exc)
    table = Table("status", "IBSI tag", "reference", "ours", "tolerance")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
        if show_all or r.status in ("fail", "known_deviation"):
            ours = "-" if r.value is None else f"{r.value:.4g}"
            ref = "-" if r.reference is None else f"{r.reference:g}"
            table.add_row(r.status, r.tag, ref, ours, f"{r.tolerance:g}")
    out.print(table)
    out.print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    raise typer.Exit(ExitCode.CHECK_FAILED if counts.get("fail") else ExitCode.OK)


def main() -> None:
    try:
        app()
    except ConfigError as exc:  # pragma: no cover - commands handle their own
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(ExitCode.CONFIG)


if __name__ == "__main__":
    main()
