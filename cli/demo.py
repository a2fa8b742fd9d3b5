"""``myelofed demo``: the whole federated study on the synthetic cohort, on this machine, ending
with a table per site and the reports."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

from cli.console import console, fail_config, out, progress_columns
from cli.exit_codes import ExitCode
from cli.tools import cohort_sizes, parse_task
from common.errors import ConfigError
from common.payloads import shown_count

if TYPE_CHECKING:
    from common.synthetic import Task


def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the cohort and the study "
                                          "results go.")] = Path("myelofed-demo"),
    cohort: Annotated[Path | None, typer.Option(
        help="A cohort made by 'myelofed simulate' (default: <out>/cohort, made if absent).")
    ] = None,
    seed: Annotated[int, typer.Option(help="The study seed (train/test split, CV folds).")] = 0,
    task: Annotated[str, typer.Option(
        help="The cohort's task: diagnosis (MM vs metastasis), response (with the ISS "
        "nomogram), pci (plasma-cell infiltration, a regression), mrd, or pfs / os "
        "(progression-free / overall survival, a Cox model stratified by site).")
    ] = "diagnosis",
    segment: Annotated[bool, typer.Option(
        "--segment", help="Start with the federated segmentation network: site_A drew no "
        "mask at all, the other sites train the network on theirs, and site_A joins the study "
        "with the masks it makes (a few minutes more).")] = False,
) -> None:
    """Run the whole federated study on the built-in synthetic cohort, on this machine.

    Makes the default three-site cohort if absent, then runs the study in Flower's simulation
    engine, one virtual SuperNode per site: handshake, federated histogram standardization and
    resolution matching of the images, local preparation, federated ComBat then CovBat and the
    radiomics model (screening + LASSO chosen by federated cross-validation) on raw and on
    harmonized features, with every site left out once, then the 3D CNN over Flower rounds.
    Ends with a table per site: the test AUC of its local-only model, the federated model, the
    federated model after harmonization, that model updated at the site on its own rows, the
    model trained without the site (leave-site-out, the external validation) and the federated
    CNN; with --task response, the nomogram (radiomics
    score + ISS stage + age) too; with --task pci, Pearson r instead of the AUC; with --task
    pfs or os, Harrell's C of the Cox models and the survival nomogram (no CNN for survival
    yet). With --segment, first the federated segmentation network (a MONAI U-Net, FedAvg):
    site_A's manifest has no mask, so its masks are the network's, and its row of the table is
    its models on them; a second table gives each site's test Dice.

    \b
    Writes, under --out:
      cohort/            the synthetic cohort (cohort-<task>/ for another task; or --cohort;
                         with --segment, cohort-segment/: its manifests, site_A's without masks)
      study/             handshake.json images.json prepare.json combat.json model.json cnn.json
                         study.json (nomogram.json with --task response; with --segment
                         segmentation.json and segmentation/segmenter.npz, the model file),
                         cnn/global_round_NNN.npz (a checkpoint per round),
                         report.html report.json report.csv (the multicentre report)
      cohort/work/<site>/study/<hash>/report/site_report.html
                         each site's own report (it stays at the site)"""
    # deferred: heavy (see cli/__init__.py); the simulation brings torch, flwr and Ray
    from cli.simulation import run_in_simulation
    from common.protocol import load_protocol, protocol_from_mapping  # deferred: heavy
    from common.synthetic import Task, read_cohort_spec  # deferred: heavy
    from common.synthetic.variants import without_masks  # deferred: heavy
    from server.report import report_paths  # deferred: heavy
    from server.study import StudySettings, StudyStopped  # deferred: heavy

    try:
        the_task = parse_task(task)
    except ConfigError as exc:
        fail_config(exc)
    cohort = cohort or out_dir / ("cohort" if the_task is Task.DIAGNOSIS else f"cohort-{task}")
    existing = read_cohort_spec(cohort)
    if existing is not None and existing.get("task") != the_task.value:
        fail_config(ConfigError(str(cohort), [f"a cohort for the task '{existing.get('task')}'"
                                              f", not '{task}'"]))
    if existing is None:
        _make_cohort(cohort, the_task)
    if segment:
        cohort = without_masks(cohort, out_dir / "cohort-segment", {"site_A"})
    try:
        protocol = load_protocol(cohort / "study.yaml")
        if segment:
            protocol = protocol_from_mapping({**protocol.model_dump(mode="json"),
                                              "segmentation": {"rounds": SEGMENT_ROUNDS}})
    except ConfigError as exc:
        fail_config(exc)
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
    out.print(summary_table(study, time.monotonic() - started))
    if (study / "repeats.json").exists():
        out.print(repeats_table(study))
    if segment:
        out.print(segmentation_table(study))
    out.print(f"results: {study}")
    paths = report_paths(study)  # the study wrote them as it ended
    out.print(f"multicentre report: {paths['html']} (also {paths['json'].name}, "
              f"{paths['csv'].name})")
    for html in sorted((cohort / "work").glob(f"*/study/{protocol.short_hash}/report/"
                                              "site_report.html")):
        out.print(f"site report ({html.parts[-5]}, stays at the site): {html}")


def _make_cohort(cohort: Path, task: Task) -> None:
    """The default three-site cohort for ``task`` (made again when an earlier one is
    incomplete)."""
    # deferred: heavy (see cli/__init__.py)
    from common.synthetic import CohortSpec, make_sites, write_cohort

    if (cohort / "study.yaml").exists() or any(cohort.glob("*/manifest.csv")):
        console.print(f"{cohort}: an incomplete cohort (no cohort.json): it is made again")
    spec = CohortSpec(make_sites(cohort_sizes(None, None), True, 0), task)
    with Progress(*progress_columns(), console=console) as progress:
        bar = progress.add_task("synthetic cohort", total=sum(cohort_sizes(None, None)))
        write_cohort(cohort, spec, on_case=lambda _: progress.advance(bar))


#: The demo table's models, in its rows: (summary row key, label).
MODEL_ROWS = (("local", "radiomics, site alone"), ("federated", "radiomics, federated"),
              ("federated_combat", "radiomics, federated + ComBat"),
              ("site_updated", "radiomics, site-updated"),
              ("leave_site_out", "radiomics, left out"),
              ("leave_site_out_combat", "radiomics, left out + ComBat"),
              ("nomogram", "nomogram (score + clinical)"), ("cnn_local", "CNN, site alone"),
              ("cnn_left_out", "CNN, left out"), ("cnn", "CNN, federated"),
              ("cnn_finetuned", "CNN, fine-tuned at the site"),
              ("cnn_updated", "CNN, site-updated"))


def summary_table(study: Path, wall_s: float) -> Table:
    """The demo's closing table from a finished study's folder: one column per site, one row
    per model the study ran (local, federated, after ComBat, updated at the site, left out,
    nomogram, the CNN's), each site's test metric; a model no site has a value for has no
    row. Sites are the columns so that every model fits an 80-column terminal."""
    # deferred: heavy (see cli/__init__.py)
    from common.metrics.tables import HEADLINE
    from server.phases.validation import summary_rows

    names = dict(HEADLINE.values())  # the headline metric's name by its key

    def read(name: str) -> Any:
        return json.loads((study / name).read_text()) if (study / name).exists() else None

    metric, rows = summary_rows(read("model.json")["models"], read("cnn.json"),
                                read("nomogram.json"))
    shown = [(key, label) for key, label in MODEL_ROWS if any(r[key] is not None for r in rows)]
    notes = ["left out: trained without the site; + ComBat: after federated ComBat (and CovBat "
             "where the protocol asks)"]
    if any(key == "site_updated" for key, _ in shown):
        notes.append("site-updated: the harmonized federated model updated on the site's own "
                     "rows (the report says which model each site should use, and why)")
    if any(key == "cnn_updated" for key, _ in shown):
        notes.append("CNN, site-updated: the federated or the fine-tuned CNN, whichever the "
                     "site's held-out training crops prefer")
    table = Table("model", *(r["site"] for r in rows),
                  title=f"Test {names[metric]} per site ({wall_s:.0f} s)",
                  caption="; ".join(notes))
    for column in table.columns[1:]:
        column.justify, column.no_wrap = "right", True
    table.add_row("test patients", *(str(shown_count(r["n_test"])) for r in rows),
                  end_section=True)
    for key, label in shown:
        table.add_row(label, *(_show(r[key]) for r in rows))
    return table


def repeats_table(study: Path) -> Table:
    """The radiomics models' mean test metric per site over the study's repeated splits
    (``validation.repeats``), with its SD."""
    from common.metrics.tables import HEADLINE  # deferred: see summary_table

    summary = json.loads((study / "repeats.json").read_text())
    sites = summary["sites"]
    name = dict(HEADLINE.values()).get(summary["metric"], summary["metric"])
    table = Table("model", *sites, title=f"Mean test {name} per site over "
                  f"{summary['finished']} splits (± SD)",
                  caption="each site's cases in folds of privacy atoms, each fold the test set "
                  "once; the table above is the first split")
    for column in table.columns[1:]:
        column.justify, column.no_wrap = "right", True

    def cell(value: dict[str, Any] | None) -> str:
        if value is None:
            return "-"
        return _show(value["mean"]) + ("" if value["sd"] is None else f" ± {value['sd']:.3f}")

    for key, label in MODEL_ROWS:
        if any(key in models for models in sites.values()):
            table.add_row(label, *(cell(models.get(key)) for models in sites.values()))
    return table


#: ``demo --segment``: rounds of the segmentation network.
SEGMENT_ROUNDS = 6


def segmentation_table(study: Path) -> Table:
    """Each site's test Dice per label with the federated segmentation network, and the masks
    it made for the site without masks."""
    seg = json.loads((study / "segmentation.json").read_text())
    table = Table("site", *(f"{label['name']} Dice" for label in seg["labels"]),
                  "masks made (passed QC)",
                  title=f"Segmentation network ({seg['architecture']}, {seg['rounds']} rounds "
                  f"of {seg['aggregator']}): test Dice per site",
                  caption=f"trained on the masks of {', '.join(seg['trained_on']['sites'])}")
    for site, m in sorted(seg["final"].items()):
        made = (f"{shown_count(int(m['auto_used']))} of {shown_count(int(m['auto_n']))}"
                if m.get("auto_n") else "-")
        table.add_row(site, *(_show(m.get(f"label_{label['value']}_dice"))
                              for label in seg["labels"]), made)
    return table


def _show(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
