"""The multicentre report's per-task tables of the federated radiomics model at each site: a
classification at its threshold, a regression's agreement, and a survival task's (a Cox model
stratified by site) C indices, time-dependent AUC and Brier score, calibration in risk groups
and Kaplan-Meier curves by predicted risk group on the protocol's grid, all as the sites sent
them (groups of at least ``validation.min_count``)."""

from __future__ import annotations

from typing import Any

from common import plots
from common.templates import at_times, confusion, fmt, with_ci


def threshold_rows(model: dict[str, Any]) -> list[dict[str, Any]]:
    """Per site, the federated logistic model at its threshold (the training prevalence)."""
    rows = []
    for site, result in sorted(model["sites"].items()):
        m = result["metrics"].get("federated") or {}
        rows.append({"site": site, **{k: fmt(m.get(k)) for k in (
            "threshold", "sensitivity", "specificity", "ppv", "npv", "accuracy", "f1", "brier",
            "calibration_intercept", "calibration_slope")},
            "confusion": confusion(m) if m else "n/a"})
    return rows


def regression_rows(model: dict[str, Any]) -> list[dict[str, Any]]:
    """Per site, the federated linear model's agreement with the measured values."""
    rows = []
    for site, result in sorted(model["sites"].items()):
        m = result["metrics"].get("federated") or {}
        rows.append({"site": site, "r": with_ci(m, "r"), "spearman": with_ci(m, "spearman"),
                     "mae": fmt(m.get("mae")), "rmse": fmt(m.get("rmse")),
                     "bias": fmt(m.get("bias")),
                     "loa": f"[{fmt(m.get('loa_low'))}, {fmt(m.get('loa_high'))}]"})
    return rows


def survival_rows(model: dict[str, Any]) -> list[dict[str, Any]]:
    """Per site, the federated Cox model's metrics on its test rows."""
    rows = []
    for site, result in sorted(model["sites"].items()):
        m = result["metrics"].get("federated") or {}
        rows.append({"site": site, "events": fmt(m.get("n_events"), 0),
                     "c_harrell": with_ci(m, "c_harrell"), "c_uno": with_ci(m, "c_uno"),
                     "tau": fmt(m.get("tau"), 0), "auc_at": at_times(m.get("auc_at")),
                     "brier_at": at_times(m.get("brier_at")),
                     "integrated_brier": fmt(m.get("integrated_brier"))})
    return rows


def calibration_rows(model: dict[str, Any]) -> list[dict[str, Any]]:
    """Per site, time and risk group: the federated model's mean predicted survival against
    the group's Kaplan-Meier estimate."""
    return [{"site": site, "time": f"{row[0]:g}", "group": row[1], "n": fmt(row[2], 0),
             "predicted": fmt(row[3]), "observed": fmt(row[4])}
            for site, result in sorted(model["sites"].items())
            for row in (result["metrics"].get("federated") or {}).get("calibration_at") or []]


def survival_figures(model: dict[str, Any], label: str) -> list[dict[str, str]]:
    """Per site, the Kaplan-Meier curves of the federated model's predicted risk groups."""
    figures = []
    for site, result in sorted(model["sites"].items()):
        curves = plots.kaplan_meier_figure(result["metrics"].get("federated") or {},
                                           f"federated model at {site}, {label}")
        if curves:
            figures.append({"title": f"Kaplan-Meier by predicted risk group at {site}",
                            "src": curves})
    return figures
