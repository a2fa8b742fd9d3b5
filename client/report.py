"""The site's own validation report: written at the site, from its own rows, and never sent.

Each phase that evaluates models at the site records what it computed under the site's study
folder (``report/*.json``): the preparation (cases used and each skipped case with its reason),
and each evaluation (every model's metrics, and what only the site may see: its ROC curves and
the scores' confusion matrices). :func:`write_site_report` renders them all into
``report/site_report.html`` (self-contained) and ``report/site_report.json`` after every
evaluation, so the report is complete when the study ends and partial if it stopped.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from client.phases.combat import scanner_diagnostic
from client.workspace import (
    EMBEDDINGS_FILE,
    HARMONIZED_EMBEDDINGS_FILE,
    HARMONIZED_FILE,
    HARMONY_STATE_FILE,
    PREPARED_FILE,
    load_study_table,
    study_dir,
)
from common import plots
from common.payloads import NOMOGRAM_SITE_UPDATED, SITE_UPDATED
from common.protocol import StudyProtocol, TaskKind
from common.provenance import REPORT_PACKAGES, atomic_write_json, software_versions
from common.site_config import SiteConfig
from common.templates import at_times, confusion, fmt, render, with_ci

REPORT_DIR = "report"
SITE_HTML, SITE_JSON = "site_report.html", "site_report.json"


def report_dir(site: SiteConfig, protocol: StudyProtocol) -> Path:
    return study_dir(site, protocol) / REPORT_DIR


def record_prepare(site: SiteConfig, protocol: StudyProtocol, reply: Any,
                   skipped_cases: list[dict[str, str]]) -> None:
    """The preparation as the site reports it to itself: its counts and every skipped case.
    It starts a run: the evaluations of an earlier run of the same protocol are removed, and
    its CNN embeddings and Harmony state (never used under a later network)."""
    counts = {k: v for k, v in asdict(reply).items() if k != "feature_names"}
    folder = report_dir(site, protocol)
    for old in folder.glob("evaluation_*.json"):  # a new preparation: a new run's evaluations
        old.unlink()
    for name in (EMBEDDINGS_FILE, HARMONY_STATE_FILE, HARMONIZED_EMBEDDINGS_FILE):
        (study_dir(site, protocol) / "cnn" / name).unlink(missing_ok=True)  # and CNN's
    atomic_write_json(folder / "prepare.json",
                      {"reply": counts, "skipped_cases": skipped_cases})


def record_evaluation(site: SiteConfig, protocol: StudyProtocol, key: str,
                      table: dict[str, Any], y: np.ndarray, scores: dict[str, np.ndarray],
                      models: dict[str, Any]) -> None:
    """One evaluation (``key``: raw, harmonized or nomogram): the metrics (the whole table, of
    which the site sends what :func:`common.metrics.tables.releasable` keeps), plus the ROC
    curves of this site's own test rows and each model's terms (kept here)."""
    roc = {}
    if protocol.task.kind is TaskKind.CLASSIFICATION and 0 < y.sum() < len(y):
        for name, score in scores.items():
            fpr, tpr, _ = roc_curve(y, score)
            roc[name] = [fpr.tolist(), tpr.tolist()]
    scatter = {}
    if protocol.task.kind is TaskKind.REGRESSION:
        scatter = {name: [y.tolist(), np.asarray(s, float).tolist()]
                   for name, s in scores.items()}
    atomic_write_json(report_dir(site, protocol) / f"evaluation_{key}.json",
                      {"metrics": table, "roc": roc, "scatter": scatter, "models": models})
    refresh_site_report(site, protocol)


def refresh_site_report(site: SiteConfig, protocol: StudyProtocol) -> None:
    """Render the site report again; a failure is logged, never raised (the evaluation it
    follows is already recorded, and the study goes on)."""
    try:
        write_site_report(site, protocol)
    except Exception as exc:  # noqa: BLE001 - the report must not stop the study
        logging.getLogger(__name__).warning("site report of %s not written: %r",
                                            site.site_name, exc)


def _harmonization_diagnostics(site: SiteConfig, protocol: StudyProtocol
                               ) -> dict[str, Any] | None:
    """The scanner effect inside this site before and after ComBat: with two or more scanners
    here, the share of features whose training rows differ between them
    (:func:`client.phases.combat.scanner_diagnostic`, as the ComBat phase reports it)."""
    folder = study_dir(site, protocol)
    if not (folder / PREPARED_FILE).is_file():
        return None
    out: dict[str, Any] = {}
    for name, file in (("before", PREPARED_FILE), ("after", HARMONIZED_FILE)):
        if not (folder / file).is_file():
            continue
        table = pd.read_parquet(folder / file)
        out["scanners"] = sorted(table.loc[table["split"] == "train", "batch"].astype(str)
                                 .unique())
        if len(out["scanners"]) < 2:
            return {"scanners": out["scanners"], "note": "one scanner here: no scanner effect "
                    "inside the site to show (ComBat's effect shows in the multicentre report)"}
        effect = scanner_diagnostic(table, protocol)
        out[name] = float("nan") if effect is None or not effect.tested else \
            effect.share_significant
    return out


def build_site_report(site: SiteConfig, protocol: StudyProtocol) -> dict[str, Any]:
    """Everything the site's page shows, from what the phases recorded here."""
    folder = report_dir(site, protocol)
    read = lambda name: (json.loads((folder / name).read_text())  # noqa: E731
                         if (folder / name).is_file() else None)
    classification = protocol.task.kind is TaskKind.CLASSIFICATION
    report: dict[str, Any] = {
        "site": site.site_name, "generated": datetime.now(UTC).strftime(
            "%Y-%m-%d %H:%M UTC"), "protocol": protocol.name,
        "protocol_hash": protocol.content_hash(), "versions": software_versions(REPORT_PACKAGES),
        "prepare": read("prepare.json"), "harmonization": _harmonization_diagnostics(
            site, protocol), "segmentation": read("segmentation.json"), "evaluations": []}
    for key, title in (("raw", "raw features"), ("harmonized", "after federated ComBat"),
                       ("nomogram", "nomogram (radiomics score + clinical factors)"),
                       ("cnn", "the federated 3D CNN (final global weights)")):
        found = read(f"evaluation_{key}.json")
        if found is None:
            continue
        metrics = found["metrics"]["models"]
        section: dict[str, Any] = {"key": key, "title": title, "figures": [], "rows": []}
        for name, row in metrics.items():
            if protocol.task.kind is TaskKind.SURVIVAL:
                section["rows"].append(survival_row(name, row))
            elif classification:
                section["rows"].append({
                    "model": name, "auc": with_ci(row, "auc"),
                    "boot": f"[{fmt(row.get('auc_boot_low'))}, {fmt(row.get('auc_boot_high'))}]",
                    **{k: fmt(row.get(k)) for k in ("threshold", "sensitivity", "specificity",
                                                      "ppv", "npv", "f1", "brier",
                                                      "calibration_slope")},
                    "confusion": confusion(row)})
            else:
                section["rows"].append({
                    "model": name, "r": with_ci(row, "r"),
                    **{k: fmt(row.get(k)) for k in ("spearman", "mae", "rmse", "bias",
                                                      "loa_low", "loa_high")}})
        update = (found["models"].get(SITE_UPDATED) or found["models"].get(NOMOGRAM_SITE_UPDATED)
                  or {})
        if "choice" in update:
            section["site_update"] = {"choice": update["choice"], "deviance": ", ".join(
                f"{name} {fmt(value, 1)}" for name, value in update["cv_deviance"].items())}
        comparisons = found["metrics"].get("comparisons", {})
        section["comparisons"] = [{"pair": pair, "difference": fmt(c.get("difference")),
                                   "z": fmt(c.get("z")), "p": fmt(c.get("p_value"))}
                                  for pair, c in comparisons.items()]
        if found["roc"]:
            section["figures"].append({"title": f"ROC curves, {title}", "src": plots.roc_figure(
                {n: (*c, metrics[n]["auc"]) for n, c in found["roc"].items()}, title)})
        if classification:
            section["figures"].append({"title": f"Calibration, {title}",
                                       "src": plots.calibration_figure(
                                           {n: m.get("calibration_curve") or []
                                            for n, m in metrics.items()}, title)})
        if found["scatter"]:
            section["figures"].append({"title": f"Predicted vs measured, {title}",
                                       "src": plots.scatter_figure(found["scatter"], title)})
        if protocol.task.kind is TaskKind.SURVIVAL:
            curves = plots.kaplan_meier_figure(
                metrics.get("federated") or metrics.get("nomogram") or {}, title)
            section["figures"] += [{"title": f"Kaplan-Meier by predicted risk group, {title}",
                                    "src": curves}] if curves else []
        nomogram = found["models"].get("nomogram")
        if key == "nomogram" and nomogram:
            section["figures"].append({"title": "Nomogram (federated), axes over this site's "
                                                "patients", "src": _nomogram_figure(
                                                    site, protocol, nomogram)})
        federated = found["models"].get("federated") or nomogram
        if federated and federated.get("coefficients"):
            section["figures"].append({"title": f"Model terms, {title}",
                                       "src": plots.bars_figure(
                                           federated["coefficients"], "coefficient "
                                           "(standardized features)", "federated model")})
        section["figures"] += found.get("overlays", [])
        report["evaluations"].append(section)
    return report


def survival_row(name: str, row: dict[str, Any]) -> dict[str, str]:
    """A Cox model's metrics as the site report's table shows them."""
    return {"model": name, "events": fmt(row.get("n_events")),
            "c_harrell": with_ci(row, "c_harrell"), "c_uno": with_ci(row, "c_uno"),
            "auc_at": at_times(row.get("auc_at")),
            "brier_at": at_times(row.get("brier_at")),
            "integrated_brier": fmt(row.get("integrated_brier"))}


def _nomogram_figure(site: SiteConfig, protocol: StudyProtocol, nomogram: dict[str, Any]
                     ) -> str:
    """The federated nomogram drawn with this site's own value ranges (its training rows'
    5th to 95th percentiles of each continuous factor; the protocol's range when it sets one).
    A logistic one reads total points as risk; a Cox one as survival at the first and the last
    of the protocol's times, with this site's own baseline (its model is stratified by site)."""
    outcomes: list[tuple[str, Callable[[float], float]]] = []
    if protocol.task.kind is TaskKind.SURVIVAL:
        baseline = nomogram.get("baseline_survival") or {}
        times = protocol.validation.times
        for t in sorted({times[0], times[-1]}):
            s0 = baseline.get(f"{t:g}")
            if s0 is not None and 0 < s0 < 1:
                outcomes.append((f"survival at {t:g} months",
                                 lambda r, s0=s0: math.log(math.log(r) / math.log(s0))))
    table = load_study_table(site, protocol, PREPARED_FILE)
    train = table[table["split"] == "train"]
    def over_patients(term: str) -> list[tuple[str, float]]:
        low, high = protocol.model.clinical_ranges.get(
            term, tuple(np.percentile(train[term].to_numpy(float), [5, 95])))
        return [(f"{v:.0f}", float(v)) for v in np.linspace(low, high, 5)]

    return plots.nomogram_figure(plots.nomogram_axes(nomogram["coefficients"], over_patients),
                                 nomogram["intercept"], f"federated nomogram at "
                                 f"{site.site_name}",
                                 *([outcomes] if protocol.task.kind is TaskKind.SURVIVAL else []))


def write_site_report(site: SiteConfig, protocol: StudyProtocol) -> Path:
    """Render ``report/site_report.html`` and ``.json`` from what is recorded; the HTML path."""
    report = build_site_report(site, protocol)
    folder = report_dir(site, protocol)
    plain = json.loads(json.dumps(report, default=str))
    for section in plain["evaluations"]:
        section.pop("figures", None)
    atomic_write_json(folder / SITE_JSON, plain)
    html = folder / SITE_HTML
    html.write_text(render("site.html.j2", report=report), encoding="utf-8")
    return html
