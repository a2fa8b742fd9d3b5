"""The tools beside the study: the synthetic cohort (``simulate``), offline ComBat
(``harmonize``), the study app's hash (``app-hash``) and the IBSI phantom check
(``ibsi-check``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from cli.console import console, fail_config, need, out, progress_columns
from cli.exit_codes import ExitCode
from client.ibsi import CONFIGURATIONS, run_phantom_check
from common.errors import ConfigError, HarmonizationError
from common.provenance import atomic_write_bytes, atomic_write_json, atomic_write_parquet

if TYPE_CHECKING:
    import pandas as pd

    from common.synthetic import Task

WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", "-j", min=1, help="Cases processed in parallel (default: all cores).")]


def simulate(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where to write the cohort.")
                       ] = Path("synthetic-cohort"),
    sites: Annotated[int | None, typer.Option(
        min=1, help="Number of sites (default: as many as --patients gives, else 3).")] = None,
    patients: Annotated[str | None, typer.Option(
        help="Patients per site, comma-separated (40,70,110), or one number for every site. "
        "Default 40,70,110 (repeated for more sites).")] = None,
    task: Annotated[str, typer.Option(
        help="diagnosis (MM vs metastasis), pci (plasma-cell infiltration), response "
        "(with ISS stage), mrd (after-treatment scans), or pfs / os (progression-free / "
        "overall survival).")] = "diagnosis",
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
    # deferred: heavy (see cli/__init__.py)
    from common.synthetic import CohortSpec, make_sites, preview_png, write_cohort

    try:
        sizes = cohort_sizes(sites, patients)
        the_task = parse_task(task)
        if modality not in ("MR", "CT"):
            raise ConfigError("--modality", [f"'{modality}' is not MR or CT"])
        if file_format not in ("nifti", "dicom", "both"):
            raise ConfigError("--format", [f"'{file_format}' is not nifti, dicom or both"])
    except ConfigError as exc:
        fail_config(exc)
    spec = CohortSpec(make_sites(sizes, scanner_effects, seed), the_task, modality, seed,
                      scanner_effects, file_format)
    with Progress(*progress_columns(), console=console) as progress:
        bar = progress.add_task("simulate", total=sum(sizes))
        manifests = write_cohort(out_dir, spec, workers=workers,
                                 on_case=lambda _: progress.advance(bar))
    preview = out_dir / "preview.png"
    preview_png(preview, spec)
    for site, manifest in manifests.items():
        out.print(f"{site}: {manifest}")
    out.print(f"study protocol: {out_dir / 'study.yaml'}")
    out.print(f"preview: {preview}")


def parse_task(task: str) -> Task:
    """``--task`` as a :class:`Task` (ConfigError naming the option)."""
    from common.synthetic import Task  # deferred: heavy (see cli/__init__.py)

    try:
        return Task(task)
    except ValueError:
        raise ConfigError("--task", [f"'{task}' is not one of "
                                     f"{', '.join(t.value for t in Task)}"]) from None


def cohort_sizes(sites: int | None, patients: str | None) -> tuple[int, ...]:
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


def harmonize(
    table: Annotated[Path, typer.Argument(
        help="Features table: .csv or .parquet, one row a case.")],
    batch_col: Annotated[str, typer.Option(help="Column naming the batch (the scanner).")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Harmonized table (.csv or "
                                            ".parquet); a .json report is written beside it.")],
    categorical: Annotated[list[str] | None, typer.Option(
        help="Categorical covariate to preserve (repeat the option for several).")] = None,
    continuous: Annotated[list[str] | None, typer.Option(
        help="Continuous covariate to preserve (repeat for several).")] = None,
    site_col: Annotated[str | None, typer.Option(
        help="Column naming the site: its rows go through one site half (default: each batch "
        "is a site).")] = None,
    ref_batch: Annotated[str | None, typer.Option(
        help="Reference batch: its rows stay as they are, the others move to it.")] = None,
    nonparametric: Annotated[bool, typer.Option(help="Non-parametric empirical Bayes.")] = False,
    mean_only: Annotated[bool, typer.Option(help="Adjust location only, not scale.")] = False,
    no_eb: Annotated[bool, typer.Option("--no-eb", help="Plain batch estimates, no EB.")] = False,
    min_batch_size: Annotated[int, typer.Option(min=2, help="Smallest batch accepted.")] = 10,
    min_cell: Annotated[int, typer.Option(
        min=1, help="Smallest count of patients behind any sum a site sends.")] = 5,
    exclude: Annotated[list[str] | None, typer.Option(
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
    # deferred: heavy (see cli/__init__.py)
    from harmonization.combat.design import CombatOptions
    from harmonization.diagnostics import site_effect_png  # deferred: heavy
    from harmonization.offline import harmonize_offline  # deferred: heavy

    categorical, continuous = list(categorical or []), list(continuous or [])
    named = [batch_col, *categorical, *continuous] + ([site_col] if site_col else [])
    try:
        frame = _read_table(table)
        labels = _label_columns(table)
        for column in sorted(labels & {*categorical, *continuous}):
            console.print(f"[yellow]warning:[/] the label '{column}' is preserved as a covariate: "
                          "harmonizing a new case will need its label (research use only)")
        features = _feature_columns(frame, str(table), named,
                                    set(named) | set(exclude or []) | {"case_id"} | labels)
    except ConfigError as exc:
        fail_config(exc)
    batch = frame[batch_col].astype(str).tolist()
    covariates = {c: frame[c].tolist() for c in (*categorical, *continuous)}
    options = CombatOptions(eb=not no_eb, parametric=not nonparametric, mean_only=mean_only,
                            ref_batch=ref_batch, min_batch_size=min_batch_size,
                            min_cell=min_cell)
    groups = frame.groupby(site_col if site_col else batch_col, sort=True).indices
    y = frame[features].to_numpy(float)
    try:
        fitted = harmonize_offline(y, batch, covariates, categorical, continuous,
                                   {str(name): rows for name, rows in groups.items()}, options)
    except HarmonizationError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(ExitCode.CONFIG) from None
    design, before, after = fitted.design, fitted.before, fitted.after
    result = frame.copy()
    result[features] = fitted.harmonized
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
    atomic_write_bytes(plot_path, site_effect_png(fitted.residual_before, fitted.residual_after,
                                                  batch, features, before))
    report["plot"] = str(plot_path)
    atomic_write_json(report_path, report)
    out.print(f"{len(frame)} rows x {len(features)} features, {design.n_batch} batches, "
              f"{len(groups)} site(s); features with a site effect (Kruskal-Wallis p < 0.05): "
              f"{before.share_significant:.0%} before, {after.share_significant:.0%} after")
    out.print(f"harmonized: {out_path}\nreport: {report_path}\nplot: {plot_path}")


def _feature_columns(frame: pd.DataFrame, source: str, named: list[str],
                     not_features: set[str]) -> list[str]:
    """The numeric columns of ``frame`` outside ``not_features``, after checking that every
    ``named`` column exists and is complete and every feature is finite (ConfigError naming
    the column)."""
    # deferred: heavy (see cli/__init__.py)
    import numpy as np
    import pandas as pd  # deferred: heavy

    missing = [c for c in named if c not in frame.columns]
    if missing:
        raise ConfigError(source, [f"no column '{c}'" for c in missing])
    incomplete = [c for c in named if frame[c].isna().any()]
    if incomplete:
        raise ConfigError(source, [f"column '{c}' has empty values" for c in incomplete])
    features = [c for c in frame.columns if c not in not_features
                and pd.api.types.is_numeric_dtype(frame[c])]
    if not features:
        raise ConfigError(source, ["no numeric feature column"])
    unusable = [c for c in features if not np.all(np.isfinite(frame[c].to_numpy(float)))]
    if unusable:
        raise ConfigError(source, [f"feature '{c}' has missing or infinite values"
                                   for c in unusable[:5]])
    return features


def _label_columns(path: Path) -> set[str]:
    """The label column named in a MyeloFed features table's metadata (none for other files)."""
    if path.suffix.lower() != ".parquet" or not path.is_file():
        return set()
    from client.pipeline import read_features_metadata  # deferred: heavy (see cli/__init__.py)

    try:
        return {read_features_metadata(path)["protocol"]["task"]["label_column"]}
    except Exception:  # noqa: BLE001 - not a MyeloFed table: nothing to exclude
        return set()


def _read_table(path: Path) -> pd.DataFrame:
    import pandas as pd  # deferred: heavy (see cli/__init__.py)

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


def _write_table(frame: pd.DataFrame, path: Path) -> None:
    if path.suffix.lower() == ".parquet":
        atomic_write_parquet(path, frame)
    else:
        atomic_write_bytes(path, frame.to_csv(index=False).encode("utf-8"))


def app_hash_command(
    app: Annotated[Path, typer.Argument(help="A released .fab file, or an app folder (with "
                                        "its pyproject.toml) as 'flwr run' is given it.")
                   ] = Path("."),
) -> None:
    """Print the SHA-256 a site approves: of a released bundle (.fab), or of the bundle 'flwr
    run' makes of an app folder. The coordinator announces it with the study; each site puts it
    in its config's approved_apps."""
    from common.bundle import bundle_hash  # deferred: flwr's CLI package (see cli/__init__.py)

    try:
        out.print(bundle_hash(app))
    except ConfigError as exc:
        fail_config(exc)


def app_build_command(
    app_dir: Annotated[Path, typer.Argument(help="The app folder (with its pyproject.toml).")
                       ] = Path("."),
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the release goes.")
                       ] = Path("release"),
) -> None:
    """Release the study app: one .fab file (Flower's bundle, exactly what the sites will
    receive) and its SHA-256, to announce to the sites."""
    from common.bundle import build_release  # deferred: flwr's CLI package (cli/__init__.py)

    if not (app_dir / "pyproject.toml").is_file():
        fail_config(ConfigError(str(app_dir), ["no pyproject.toml: not a Flower app folder"]))
    path, digest = build_release(app_dir, out_dir)
    out.print(f"release: {path}")
    out.print(f"sha256: {digest}  (announce it; sites put it in approved_apps)")


def app_unpack_command(
    fab: Annotated[Path, typer.Argument(help="A released .fab file ('myelofed app build').")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="A new folder for the app.")],
) -> None:
    """Unpack a released bundle for 'flwr run OUT study': checks that Flower bundles the folder
    back into the release's exact bytes (the hash the sites approved)."""
    from common.bundle import unpack  # deferred: flwr's CLI package (see cli/__init__.py)

    need(fab)
    try:
        digest = unpack(fab, out_dir)
    except ConfigError as exc:
        fail_config(exc)
    out.print(f"unpacked {fab.name} into {out_dir}: 'flwr run' ships sha256 {digest}")


#: Where the IBSI digital phantom is looked for by default: shared/data/ibsi beside the checkout.
DEFAULT_IBSI_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ibsi"


def ibsi_check(
    data_dir: Annotated[Path, typer.Option(
        help="Folder with the phantom (digital_phantom/ or ibsi_1_digital_phantom/, "
             "ibsi_1_ct_radiomics_phantom/ for A-E) and the reference CSVs (at its top or "
             "under reference_values/, as in IBSI's repositories).")
    ] = DEFAULT_IBSI_DIR,
    configuration: Annotated[list[str], typer.Option(
        "--configuration", "-c",
        help="phantom (the digital phantom), A-E (IBSI-1 configurations on the CT radiomics "
             "phantom: resampling, re-segmentation, bin size and number) or all; repeatable.")
    ] = ["phantom"],  # noqa: B006 (typer reads the default)
    show_all: Annotated[bool, typer.Option("--all", help="List every feature.")] = False,
) -> None:
    """Extract IBSI-1 phantoms through this installation's site path and compare every feature
    that has an IBSI consensus value (2D, 2.5D and 3D, averaged and merged) with it. Exit 0 when
    all agree."""
    chosen = list(CONFIGURATIONS) if "all" in configuration else configuration
    rows = []
    try:
        for name in chosen:
            name = name if name == "phantom" else name.upper()
            rows += [(name, r) for r in run_phantom_check(data_dir, name)]
    except ConfigError as exc:
        fail_config(exc)
    table = Table("configuration", "status", "IBSI tag", "reference", "ours", "tolerance")
    counts: dict[str, int] = {}
    for name, r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
        if show_all or r.status in ("fail", "known_deviation"):
            ours = "-" if r.value is None else f"{r.value:.4g}"
            ref = "-" if r.reference is None else f"{r.reference:g}"
            table.add_row(name, r.status, r.tag, ref, ours, f"{r.tolerance:g}")
    if table.row_count:
        out.print(table)
    out.print(f"{', '.join(chosen)}: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    raise typer.Exit(ExitCode.CHECK_FAILED if counts.get("fail") else ExitCode.OK)
