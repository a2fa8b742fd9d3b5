"""The multicentre validation report, written by the coordinator from the study's JSON files.

``report.html`` (self-contained: figures are inline SVG images, it opens offline), ``report.json``
(everything the page shows, in one file) and ``report.csv`` (one row per site, feature set, model
and metric), all under the study's output folder. Built from what the study already wrote
(``handshake.json``, ``images.json``, ``prepare.json``, ``combat.json``, ``model.json``,
``nomogram.json``, ``cnn.json``, ``harmony.json``, ``study.json``), so ``myelofed report OUT``
renders it again at any time.

Per site and model side by side: the local-only model, the federated model, the model trained
without the site (leave-one-site-out), on raw and on harmonized features, the nomogram and the
CNN; a forest plot of the per-site AUCs with the random-effects pooled estimate and I-squared;
the cross-site matrix (each site's local model at every site) as a heat map; calibration and
decision curves as the sites binned them; DeLong's tests; the selected features; the training
curves; the image harmonization (each scanner's body histogram landmarks against the study's
standard); the protocol hash, what was excluded and why.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from common import plots
from common.errors import ConfigError
from common.metrics.tables import HEADLINE
from common.payloads import shown_count, shown_counts
from common.provenance import (
    REPORT_PACKAGES,
    atomic_write_bytes,
    atomic_write_json,
    software_versions,
)
from common.templates import fmt, render, with_ci
from harmonization.images import PERCENTILES
from server.phases.validation import recommendation
from server.report_tables import (
    calibration_rows,
    csv_rows,
    harmony_section,
    regression_rows,
    repeats_section,
    segmentation_section,
    survival_figures,
    survival_rows,
    threshold_rows,
)

REPORT_HTML, REPORT_JSON, REPORT_CSV = "report.html", "report.json", "report.csv"
PHASE_FILES = ("protocol", "handshake", "segmentation", "images", "prepare", "combat", "model",
               "nomogram", "repeats", "cnn", "harmony", "study")


def read_study(out_dir: Path) -> dict[str, Any]:
    """The phase files present in ``out_dir`` (a missing phase is absent; a broken file is an
    error naming it)."""
    if not out_dir.is_dir():
        raise ConfigError(str(out_dir), ["not a folder of study results"])
    found = {}
    for name in PHASE_FILES:
        path = out_dir / f"{name}.json"
        if path.is_file():
            try:
                found[name] = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(str(path), [f"not valid JSON: {exc}"]) from None
    if "handshake" not in found:
        raise ConfigError(str(out_dir), ["no handshake.json: not the output folder of a study"])
    return found


def _model_label(model: dict[str, Any]) -> str:
    return "harmonized features" if model["harmonized"] else "raw features"


def _side_by_side(model: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """Per site: local-only, federated and leave-site-out with CIs (the paper's table)."""
    rows = []
    for site, result in sorted(model["sites"].items()):
        m = result["metrics"]
        rows.append({"site": site, "n_test": shown_count(result["n_test"]),
                     "n_positive": result.get("n_positive"),
                     "local": with_ci(m.get(f"local {site}"), metric),
                     "federated": with_ci(m.get("federated"), metric),
                     "site_updated": with_ci(m.get("site-updated"), metric),
                     "leave_site_out": with_ci(m.get("leave-site-out"), metric),
                     "p_federated_vs_local": fmt(result.get("comparisons", {}).get(
                         f"federated vs local {site}", {}).get("p_value")),
                     "recommended": recommendation(result.get("update"))})
    return rows


def _harmonization_section(models: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per site, what harmonization changed: the federated model's and the model trained
    without the site's test metric (AUC, or Pearson r) on raw and on harmonized features."""
    raw = next((m for m in models if not m["harmonized"]), None)
    harmonized = next((m for m in models if m["harmonized"]), None)
    if raw is None or harmonized is None:
        return None
    metric, metric_name = HEADLINE[raw.get("loss", "gaussian")]

    def value(model: dict[str, Any], site: str, name: str) -> float | None:
        row = model["sites"].get(site, {}).get("metrics", {}).get(name) or {}
        out = row.get(metric)
        return None if out is None else float(out)

    rows = []
    for site in sorted(set(raw["sites"]) & set(harmonized["sites"])):
        row: dict[str, Any] = {"site": site}
        for name, key in (("federated", "federated"), ("leave-site-out", "loso")):
            before, after = value(raw, site, name), value(harmonized, site, name)
            row |= {f"{key}_raw": fmt(before), f"{key}_harmonized": fmt(after),
                    f"{key}_change": fmt(None if before is None or after is None
                                         else after - before)}
        rows.append(row)
    return {"metric": metric_name, "rows": rows}


def _forest(model: dict[str, Any], kind: str, title: str) -> str | None:
    pooled = model.get("pooled", {}).get(kind)
    if not pooled:
        return None
    rows = [(site, r["value"], r["low"], r["high"]) for site, r in pooled["sites"].items()]
    p = pooled["pooled"]
    # the line of no discrimination: an AUC or a C index of 0.5, a correlation of 0
    return plots.forest_figure(rows, (p["estimate"], p["low"], p["high"]) if p else None,
                               HEADLINE[model["loss"]][1], title,
                               0.0 if model["loss"] == "gaussian" else 0.5)


def _cross_site(model: dict[str, Any], metric: str) -> tuple[list[str], list[str], np.ndarray]:
    sites = sorted(model["sites"])
    rows = ["federated"] + [f"local {s}" for s in sorted(model.get("local_models", {}))]
    matrix = np.full((len(rows), len(sites)), np.nan)
    for j, site in enumerate(sites):
        metrics = model["sites"][site]["metrics"]
        for i, name in enumerate(rows):
            value = (metrics.get(name) or {}).get(metric)
            if value is not None:
                matrix[i, j] = value
    return rows, sites, matrix


def _selected(model: dict[str, Any]) -> dict[str, float]:
    fed = model["training_sets"]["federated"]["model"]
    return {f: c for f, c in zip(fed["features"], fed["coefficients"], strict=True) if c != 0}


def _model_section(model: dict[str, Any]) -> dict[str, Any]:
    metric, metric_name = HEADLINE[model["loss"]]
    label = _model_label(model)
    section: dict[str, Any] = {"label": label, "metric": metric_name,
                               "rows": _side_by_side(model, metric), "figures": [],
                               "pooled": []}
    for kind, title in (("federated", "federated model"), ("leave-site-out",
                                                          "trained without the site"),
                        ("local", "each site's local model")):
        figure = _forest(model, kind, f"{title}, {label}")
        if figure:
            section["figures"].append({"title": f"Forest plot: {title}", "src": figure})
        p = (model.get("pooled", {}).get(kind) or {}).get("pooled")
        if p:
            section["pooled"].append({"model": kind, "estimate": fmt(p["estimate"]),
                                      "ci": f"[{fmt(p['low'])}, {fmt(p['high'])}]",
                                      "i2": f"{100 * p['i2']:.0f}%", "tau2": fmt(p["tau2"], 4),
                                      "p": fmt(p["p_heterogeneity"]),
                                      "sites": ", ".join(p["sites"])})
    rows, sites, matrix = _cross_site(model, metric)
    section["figures"].append({"title": "Cross-site matrix", "src": plots.heatmap_figure(
        matrix, rows, sites, f"each model at each site, {label}", metric_name)})
    if model["loss"] == "cox":
        section["survival_rows"] = survival_rows(model)
        section["survival_calibration"] = calibration_rows(model)
        section["figures"] += survival_figures(model, label)
    elif metric == "auc":
        section["threshold_rows"] = threshold_rows(model)
        curves = {s: (r["metrics"].get("federated") or {}).get("calibration_curve") or []
                  for s, r in sorted(model["sites"].items())}
        section["figures"].append({"title": "Calibration of the federated model (binned at "
                                            "each site)", "src": plots.calibration_figure(
                                                curves, f"federated model, {label}")})
        decisions = {s: (r["metrics"].get("federated") or {}).get("decision_curve") or []
                     for s, r in sorted(model["sites"].items())}
        section["figures"].append({"title": "Decision curves of the federated model",
                                   "src": plots.decision_figure(decisions,
                                                                f"federated model, {label}")})
    else:
        section["regression_rows"] = regression_rows(model)
    selected = _selected(model)
    if selected:
        section["figures"].append({"title": "Selected features (federated model)",
                                   "src": plots.bars_figure(selected, "standardized coefficient",
                                                            f"{len(selected)} features, {label}")})
    fed = model["training_sets"]["federated"]
    section["figures"].append({"title": "Federated cross-validation", "src": plots.lines_figure(
        {"CV loss": (fed["lambdas"], fed["cv_loss"])}, "penalty (lambda)", "held-out loss",
        f"chosen lambda {fed['lambdas'][fed['chosen']]:.3g}", log_x=True)})
    section["selected"] = list(selected)
    section["failed"] = model.get("failed", {})
    return section


def _nomogram_section(nomogram: dict[str, Any], ranges: dict[str, Any]) -> dict[str, Any]:
    if nomogram.get("status") != "done":
        return {"status": nomogram.get("status", "not run"), "figures": [], "rows": []}
    fed = nomogram["training_sets"]["federated"]
    loss, ratio = nomogram.get("loss", "logistic"), nomogram.get("ratio", "odds_ratios")
    metric, metric_name = HEADLINE[loss]
    ratios = {t: v if isinstance(v, list) else [v, None, None] for t, v in fed[ratio].items()}
    name = "hazard ratio" if ratio == "hazard_ratios" else "odds ratio"
    figures = [{"title": f"Forest plot: each term's {name} (federated nomogram)",
                "src": plots.forest_figure([(t, *v) for t, v in ratios.items()], None,
                                           name, "federated nomogram", 1.0)}]
    if loss == "logistic":  # a points nomogram ends on a probability: the logistic model's
        def over_range(term: str) -> list[tuple[str, float]]:  # the protocol's range, or 0-100
            low, high = ranges.get(term, (0.0, 100.0))
            return [(f"{v:g}", float(v)) for v in np.linspace(low, high, 6)]

        figures.insert(0, {"title": "Nomogram (federated)", "src": plots.nomogram_figure(
            plots.nomogram_axes(fed["coefficients"], over_range), fed["intercept"],
            "federated nomogram")})
    rows = []
    for site, result in sorted(nomogram["sites"].items()):
        m = result["metrics"]
        rows.append({"site": site, "n_test": shown_count(result["n_test"]),
                     "nomogram": with_ci(m.get("nomogram"), metric),
                     "site_updated": with_ci(m.get("nomogram site-updated"), metric),
                     "leave_site_out": with_ci(m.get("nomogram leave-site-out"), metric),
                     "recommended": recommendation(result.get("update"))})
    return {"status": "done", "metric": metric_name, "ratio_name": name, "ratios": {
        t: with_ci(dict(zip(("r", "r_low", "r_high"), v, strict=True)), "r") for t, v in
        ratios.items()}, "figures": figures, "rows": rows,
        "harmonized": nomogram.get("harmonized"), "left_out": dict(nomogram.get("left_out", {}))}


def _images_section(images: dict[str, Any]) -> dict[str, Any]:
    """The image harmonization: per scanner its training images and mean landmarks before
    standardization against the study's standard, as a table and a figure."""
    standard = images["standard"]
    percentiles = list(PERCENTILES)
    shown = [percentiles.index(p) for p in (1.0, 10.0, 50.0, 90.0, 99.0)]
    acquisition = standard.get("acquisition", {})

    def measured(name: str) -> dict[str, str]:
        a = acquisition.get(name)
        return {} if a is None else {"noise": fmt(a["noise"], 2),
                                     "spacing (mm)": " x ".join(fmt(v, 2) for v in a["spacing"])}

    rows = [{"scanner": name, "images": count,
             **{f"p{int(percentiles[i])}": fmt(landmarks[i], 1) for i in shown}, **measured(name)}
            for name, (count, landmarks) in sorted(standard["scanners"].items())]
    target = standard.get("spacing")
    rows.append({"scanner": "study standard", "images": sum(
        n for n, _ in standard["scanners"].values()),
        **{f"p{int(percentiles[i])}": fmt(standard["landmarks"][i], 1) for i in shown},
        **({"noise": "not matched" if standard.get("noise") is None else
            fmt(standard["noise"], 2) + " (target)",
            "spacing (mm)": "not matched" if target is None else
            " x ".join(fmt(v, 2) for v in target) + " (target)"} if acquisition else {})})
    series = {name: (landmarks, percentiles)
              for name, (_, landmarks) in sorted(standard["scanners"].items())}
    series["study standard"] = (standard["landmarks"], percentiles)
    return {"rows": rows, "columns": ["scanner", "images",
                                      *[f"p{int(percentiles[i])}" for i in shown],
                                      *(["noise", "spacing (mm)"] if acquisition else [])],
            "scale": standard["scale"],
            "figure": plots.lines_figure(series, "mapped intensity (1st percentile = 0, 99th = "
                                         f"{standard['scale']:g})", "percentile of the body",
                                         "Body histogram landmarks per scanner"),
            "left_out": {site: ", ".join(names) for site, names in standard["left_out"].items()},
            "missing": images.get("missing", {})}


def _privacy_section(privacy: dict[str, Any]) -> dict[str, Any]:
    """The CNN's local differential privacy as the report shows it (per site, its spend)."""
    rows = [{"site": site, "rounds sent": v["rounds"], "epsilon": fmt(v["epsilon"]),
             "delta": f"{v['delta']:.2g}"}
            for site, v in sorted(privacy.get("per_site", {}).items())]
    return {**privacy, "rows": rows}


def _loso_rows(loso: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The CNN trained without each site, scored there (``cnn.leave_site_out``), with the
    reason for each site skipped."""
    if not loso:
        return []
    rows = [{"site": site, "test_n": fmt(m.get("test_n")), "test_auc": fmt(m.get("test_auc")),
             "test_pearson_r": fmt(m.get("test_pearson_r")), "note": ""}
            for site, m in sorted(loso.get("sites", {}).items())]
    return rows + [{"site": site, "test_n": "", "test_auc": "", "test_pearson_r": "",
                    "note": f"not run: {why}"}
                   for site, why in sorted(loso.get("skipped", {}).items())]


def _cnn_section(cnn: dict[str, Any]) -> dict[str, Any]:
    history = cnn.get("history", {})
    rounds = sorted(int(r) for r in history)
    sites = sorted({s for r in history.values() for s in r})
    loss = {s: (rounds, [history[str(r)].get(s, {}).get("train_loss") for r in rounds])
            for s in sites}
    auc = {s: (rounds, [history[str(r)].get(s, {}).get("global_test_auc") for r in rounds])
           for s in sites}
    final = [{"site": s, **{k: fmt(v) for k, v in m.items()}}
             for s, m in sorted(cnn.get("final", {}).items())]
    return {"architecture": cnn.get("architecture"), "aggregator": cnn.get("aggregator"),
            "rounds": cnn.get("rounds"), "final": final, "failed": cnn.get("failed", {}),
            "left_out": cnn.get("left_out", []),
            "privacy": _privacy_section(cnn.get("privacy") or {"mechanism": "none"}),
            "final_keys": sorted({k for m in cnn.get("final", {}).values() for k in m}),
            "leave_site_out": _loso_rows(cnn.get("leave_site_out")),
            "figures": [
                {"title": "CNN training loss per site and round",
                 "src": plots.lines_figure(loss, "round", "training loss", "local training")},
                {"title": "CNN: test AUC of the global model each site received",
                 "src": plots.lines_figure(auc, "round", "AUC", "global model at each site")}]}


def build_report(out_dir: Path) -> dict[str, Any]:
    """Everything the report shows, from the study's files."""
    return _report_of(read_study(out_dir), out_dir)


def _report_of(study: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    handshake = study["handshake"]
    prepare = study.get("prepare", {})
    report: dict[str, Any] = {
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "out_dir": str(out_dir), "status": study.get("study", {"status": "unknown"}),
        "protocol_hash": next((s["protocol_hash"] for s in handshake["sites"]
                               if s.get("protocol_hash")), ""),
        "versions": software_versions(REPORT_PACKAGES),
        "protocol": study.get("protocol"),
        "cohort": [{"site": s["site"], "status": s["status"], "reason": s.get("reason", ""),
                    "hash": (s.get("protocol_hash") or "")[:12],
                    "usable": shown_count(s.get("n_usable", 0)),
                    "skipped": shown_counts(s.get("skipped", "")),
                    "labels": shown_counts(s.get("label_counts", ""))}
                   for s in handshake["sites"]],
        "split": [{"site": s["site"], "n_train": shown_count(s.get("n_train", 0)),
                   "n_test": shown_count(s.get("n_test", 0)),
                   "train_labels": shown_counts(s.get("train_labels", "")),
                   "test_labels": shown_counts(s.get("test_labels", "")),
                   "batches": shown_counts(s.get("batches", ""))}
                  for s in prepare.get("sites", [])],
        "excluded": {**handshake.get("excluded", {}), **prepare.get("excluded", {})},
        "segmentation": (segmentation_section(study["segmentation"])
                         if "segmentation" in study else None),
        "images": _images_section(study["images"]) if "images" in study else None,
        "combat": study.get("combat"),
        "harmonization_change": _harmonization_section(
            study.get("model", {}).get("models", [])),
        "models": [_model_section(m) for m in study.get("model", {}).get("models", [])],
        "nomogram": (_nomogram_section(study["nomogram"], study["nomogram"].get("ranges", {}))
                     if "nomogram" in study else None),
        "repeats": repeats_section(study["repeats"]) if "repeats" in study else None,
        "cnn": _cnn_section(study["cnn"]) if "cnn" in study else None,
        "harmony": harmony_section(study["harmony"]) if "harmony" in study else None,
    }
    return report


def report_paths(out_dir: Path) -> dict[str, Path]:
    """Where :func:`write_report` writes in ``out_dir``, by kind (html, json, csv)."""
    return {"html": out_dir / REPORT_HTML, "json": out_dir / REPORT_JSON,
            "csv": out_dir / REPORT_CSV}


def write_report(out_dir: Path) -> dict[str, Path]:
    """Write report.html, report.json and report.csv into ``out_dir``; their paths."""
    study = read_study(out_dir)
    report = _report_of(study, out_dir)
    paths = report_paths(out_dir)
    without_figures = json.loads(json.dumps(report, default=str))
    for section in [*without_figures["models"], without_figures.get("nomogram") or {},
                    without_figures.get("cnn") or {},
                    without_figures.get("segmentation") or {}]:
        section.pop("figures", None)
    atomic_write_json(paths["json"], without_figures)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, ["site", "features", "model", "metric", "value"])
    writer.writeheader()
    writer.writerows(csv_rows(study))
    # Written like every other output: atomically, readable by the coordinator's user only.
    atomic_write_bytes(paths["csv"], table.getvalue().encode("utf-8"))
    atomic_write_bytes(paths["html"], render("multicentre.html.j2", report=report).encode())
    return paths
