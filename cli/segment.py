"""``myelofed site train-segmenter`` and ``myelofed site segment``: a site's segmentation network
on its own cases, outside a study or with the study's model. Images, masks and per-case figures
stay in the site's output folder."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.console import console, fail_config, out
from cli.exit_codes import ExitCode
from common.errors import ConfigError
from common.provenance import atomic_write_json

MODEL_FILE = "segmenter.npz"
#: The manifest column that says where a case's mask came from: ``manual`` or ``auto``.
MASK_SOURCE = "mask_source"


def _setup(protocol_src: str, manifest: Path, out_dir: Path, site_name: str | None,
           device: str) -> tuple[Any, Any, list[Any], list[Any]]:
    # deferred: heavy (see cli/__init__.py)
    from client.manifest import read_manifest
    from common.protocol import load_protocol
    from common.site_config import SiteConfig

    try:
        protocol = load_protocol(protocol_src)
        config = SiteConfig(site_name=site_name or manifest.resolve().parent.name or "site",
                            manifest=manifest, work_dir=out_dir, device=device)
        cases, problems = read_manifest(manifest, protocol, default_batch=config.site_name,
                                        for_segmentation=True)
    except ConfigError as exc:
        fail_config(exc)
    for problem in problems:
        console.print(f"row {problem.row} ({problem.case_id}) skipped: {problem.reason.value}: "
                      f"{problem.detail}", highlight=False)
    return protocol, config, cases, problems


def _agreement_table(results: list[Any], header: Any, seed: int) -> dict[str, Any]:
    """Per label: the compared cases' Dice and HD95, mean [95% bootstrap CI]; printed too."""
    from client.segment.site import agreement_summary  # deferred: heavy

    compared = [r for r in results if r.agreement]
    summary: dict[str, Any] = {"cases": len(compared)}
    if not compared:
        return summary
    _, rows = agreement_summary(compared, header.labels, seed, 1)  # nothing leaves: no floor
    table = Table("label", "cases", "Dice", "95% CI", "HD95 mm", "95% CI",
                  title="Agreement with the hand-drawn masks")
    for row in rows:
        d, h = row["dice"], row["hd95"]
        summary[str(row["label"])] = {"name": row["name"], "dice": d, "hd95_mm": h}
        table.add_row(f"{row['label']} {row['name']}", str(len(compared)), f"{d[0]:.3f}",
                      f"{d[1]:.3f}-{d[2]:.3f}", f"{h[0]:.2f}", f"{h[1]:.2f}-{h[2]:.2f}")
    out.print(table)
    return summary


def train_segmenter(
    protocol: Annotated[str, typer.Option("--protocol", "-p", help="Study protocol with a "
                                          "segmentation section, or preset:NAME.")],
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="Site manifest CSV; the "
                                           "cases with a mask train the network.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder: segmenter.npz "
                                          "and segmentation_check.json.")],
    test_fraction: Annotated[float, typer.Option(
        min=0.0, max=0.9, help="Share of the cases with a mask held out to check the "
        "network on (0: none).")] = 0.25,
    epochs: Annotated[int | None, typer.Option(
        min=1, help="Training epochs (default: the protocol's rounds x local_epochs, the "
        "federation's budget).")] = None,
    seed: Annotated[int, typer.Option(help="Initial weights, split and sampling.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")
                      ] = "auto",
    site_name: Annotated[str | None, typer.Option(help="This site's name (default: the "
                                                  "manifest's folder name).")] = None,
) -> None:
    """Train the protocol's segmentation network on this site's cases with a mask, alone, and
    check it on the held-out ones (Dice and HD95 per label, with bootstrap CIs).

    \b
    Writes <out>/segmenter.npz (the weights, and the training masks' volume range and part
    counts, which the quality control of 'myelofed site segment' compares with) and
    <out>/segmentation_check.json (per held-out case and in summary; it stays here).
    In a federated study the network is trained by every site together instead."""
    # deferred: torch and MONAI load with these (see cli/__init__.py)
    from client.cnn.device import select_device, torch_threads
    from client.segment.site import (
        header_of,
        load_training,
        segment_case,
        split_cases,
        train_alone,
    )

    # deferred: as above
    from common.network import state_arrays
    from common.segmenter import save_segmenter, segmentation_spec

    proto, config, cases, _ = _setup(protocol, manifest, out_dir, site_name, device)
    try:
        torch_device = select_device(config.device)
        segmentation_spec(proto)
    except ConfigError as exc:
        fail_config(exc)
    split = split_cases(cases, seed, config.site_name, test_fraction)
    loaded = load_training(split.train, proto, config.budget)
    for case_id, reason in loaded.skipped.items():
        console.print(f"{case_id} skipped: {reason}", highlight=False)
    if not loaded.cases:
        console.print("[bold red]no case with a usable mask to train on[/]")
        raise typer.Exit(ExitCode.NO_USABLE_CASE)
    with torch_threads(config.n_workers):
        network, result = train_alone(proto, list(loaded.cases.values()), seed=seed,
                                      site_name=config.site_name, device=torch_device,
                                      epochs=epochs)
        console.print(f"trained on {result.cases} cases: {result.patches} patches, loss "
                      f"{result.loss:.4f}, {result.seconds:.0f} s on {torch_device}")
        header = header_of(proto, list(loaded.shapes.values()),
                           {"sites": [config.site_name], "cases": result.cases})
        save_segmenter(out_dir / MODEL_FILE, header, state_arrays(network))
        network.eval()
        results = [segment_case(c, proto, header, network, config.budget, torch_device,
                                compare=True) for c in split.test]
    summary = _agreement_table(results, header, seed)
    atomic_write_json(out_dir / "segmentation_check.json", {
        "protocol_hash": proto.content_hash(), "trained_on": result.cases,
        "skipped": loaded.skipped, "summary": summary,
        "cases": [{"case_id": r.case_id, "problems": list(r.problems),
                   "agreement": {str(k): {"dice": v[0], "hd95_mm": v[1]}
                                 for k, v in r.agreement.items()}} for r in results]})
    out.print(f"model: {out_dir / MODEL_FILE}")
    raise typer.Exit(ExitCode.CASES_SKIPPED if loaded.skipped else ExitCode.OK)


def segment(
    protocol: Annotated[str, typer.Option("--protocol", "-p", help="Study protocol file, or "
                                          "preset:NAME.")],
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="Site manifest CSV: the "
                                           "rows whose mask is empty or 'auto' are segmented.")],
    model: Annotated[Path, typer.Option("--model", help="Segmentation model file (the study's "
                                        "segmenter.npz, or 'myelofed site train-segmenter').")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder: masks/, "
                                          "manifest.csv and segmentation_report.json.")],
    every_case: Annotated[bool, typer.Option(
        "--all", help="Segment the cases with a mask too, and measure the agreement with it "
        "(their manifest rows keep the hand-drawn mask).")] = False,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")
                      ] = "auto",
    site_name: Annotated[str | None, typer.Option(help="This site's name (default: the "
                                                  "manifest's folder name).")] = None,
) -> None:
    """Segment the cases that have no mask with a segmentation model, check each mask, and
    write a manifest that names them.

    \b
    Writes <out>/masks/<case>.nii.gz (and <case>.seg.dcm, a DICOM SEG referencing the series,
    for a DICOM image), <out>/manifest.csv (the manifest with those masks filled in and a
    mask_source column, manual or auto) and <out>/segmentation_report.json. A mask that fails
    quality control (empty, fragmented, or a volume outside the training masks' range) is
    named and not used: its row keeps an empty mask, so extraction skips it, saying why."""
    # deferred: torch, MONAI and highdicom load with these (see cli/__init__.py)
    from client.cnn.device import select_device, torch_threads
    from client.segment.site import segment_case, write_mask
    from common.segmenter import load_segmenter

    proto, config, cases, problems = _setup(protocol, manifest, out_dir, site_name, device)
    try:
        torch_device = select_device(config.device)
        header, network = load_segmenter(model, proto)
    except ConfigError as exc:
        fail_config(exc)
    todo = [c for c in cases if every_case or c.mask is None]
    masks = out_dir / "masks"
    made: dict[str, str] = {}
    records, results = [], []
    with torch_threads(config.n_workers):
        for case in todo:
            result = segment_case(case, proto, header, network, config.budget, torch_device,
                                  compare=case.mask is not None)
            results.append(result)
            problems_here = list(result.problems)
            files: list[str] = []
            if result.mask is not None and not problems_here:
                written, problem = write_mask(case, result.mask, header, masks)
                files = [str(f) for f in written]
                problems_here += [problem] if problem else []
                if case.mask is None:
                    made[case.case_id] = str(written[0].resolve())
            for line in problems_here:
                console.print(f"{case.case_id}: {line}", highlight=False)
            records.append({"case_id": case.case_id, "auto": case.mask is None,
                            "used": case.case_id in made, "problems": problems_here,
                            "files": files,
                            "agreement": {str(k): {"dice": v[0], "hd95_mm": v[1]}
                                          for k, v in result.agreement.items()}})
    summary = _agreement_table(results, header, 0) if every_case else {}
    _write_manifest(manifest, out_dir / "manifest.csv", made)
    atomic_write_json(out_dir / "segmentation_report.json", {
        "model": str(model), "trained_on": header.trained_on, "cases": records,
        "manifest_problems": [{"row": p.row, "case_id": p.case_id, "reason": p.reason.value,
                               "detail": p.detail} for p in problems],
        "agreement": summary})
    failed = [r["case_id"] for r in records if r["auto"] and not r["used"]]
    out.print(f"{len(made)} mask(s) made, {len(failed)} refused"
              + (f" ({', '.join(failed)})" if failed else "") + f"; manifest: "
              f"{out_dir / 'manifest.csv'}")
    if todo and not made and not every_case:
        raise typer.Exit(ExitCode.NO_USABLE_CASE)
    raise typer.Exit(ExitCode.CASES_SKIPPED if failed or problems else ExitCode.OK)


def _write_manifest(source: Path, target: Path, made: dict[str, str]) -> None:
    """The manifest with the masks made filled in (absolute paths) and a ``mask_source``
    column; every other field as it was."""
    with source.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f for f in (reader.fieldnames or []) if f]
        rows = list(reader)
    base = source.resolve().parent
    columns = fields + ([MASK_SOURCE] if MASK_SOURCE not in fields else [])
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            case_id = (row.get("case_id") or "").strip()
            for column in ("image", "mask"):  # relative paths stay right from the new folder
                value = (row.get(column) or "").strip()
                if value and value != "auto" and not Path(value).is_absolute():
                    row[column] = str((base / value).resolve())
            if case_id in made:
                row["mask"], row[MASK_SOURCE] = made[case_id], "auto"
            elif not row.get(MASK_SOURCE):
                row[MASK_SOURCE] = "manual" if (row.get("mask") or "").strip() not in (
                    "", "auto") else ""
            writer.writerow(row)
