"""The multicentre report's tables: the segmentation network's per site, the repeated splits',
the CSV's rows, and the per-task tables of the federated radiomics model at each site: a
classification at its threshold, a regression's agreement, and a survival task's (a Cox model
stratified by site) C indices, time-dependent AUC and Brier score, calibration in risk groups
and Kaplan-Meier curves by predicted risk group on the protocol's grid, all as the sites sent
them (groups of at least ``validation.min_count``)."""

from __future__ import annotations

from typing import Any

from common import plots
from common.payloads import shown_count
from common.templates import at_times, confusion, fmt, with_ci
from server.phases.validation import REPEATED_MODELS


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


def _count(value: float | None) -> int | str:
    """A count as a site sent it (a float in a metric record) for a table."""
    return "n/a" if value is None else shown_count(int(value))


def segmentation_section(seg: dict[str, Any]) -> dict[str, Any]:
    """The segmentation network: per site, its test Dice and HD95 per label with their CIs,
    the masks it made of the cases without one (and how many passed quality control), and
    whether the site trained it (a site without masks does not); the training loss per round."""
    labels = seg.get("labels", [])
    left = {}
    for entry in seg.get("left_out", []):
        left.setdefault(entry["site"], entry["reason"])
    history = seg.get("history", {})
    loso = seg.get("leave_site_out")
    trained = set(seg.get("trained_on", {}).get("sites", []))
    rows = []
    for site, m in sorted(seg.get("final", {}).items()):
        row: dict[str, Any] = {"site": site, "test_n": _count(m.get("test_n")),
                               "trained": "yes" if site in trained else
                               f"no: {left.get(site, 'no update')}"[:160],
                               "masks_made": (f"{_count(m.get('auto_used'))} of "
                                              f"{_count(m.get('auto_n'))}"),
                               "icc": (f"{m['icc_good_share']:.0%} (median ICC "
                                       f"{m.get('icc_median') or float('nan'):.3f}, "
                                       f"{_count(m.get('icc_n'))} cases)"
                                       if m.get("icc_good_share") is not None else "n/a")}
        for label in labels:
            v = label["value"]
            row[f"dice_{v}"] = with_ci(m, f"label_{v}_dice")
            row[f"hd95_{v}"] = with_ci(m, f"label_{v}_hd95")
            if loso is not None:
                row[f"loso_{v}"] = (with_ci(loso["sites"][site], f"label_{v}_dice")
                                    if site in loso["sites"] else
                                    f"n/a: {loso['skipped'].get(site, 'not run')}")
        rows.append(row)
    kinds = ("dice", "hd95", *(("loso",) if loso is not None else ()))
    names = {"dice": "Dice [95% CI]", "hd95": "HD95 mm [95% CI]",
             "loso": "Dice without the site (leave-site-out)"}
    columns = ["site", "trained", "test_n", *(f"{k}_{label['value']}" for label in labels
                                              for k in kinds), "icc", "masks_made"]
    headers = ["site", "trained on its masks", "test masks",
               *(f"{label['name']} {names[k]}" for label in labels for k in kinds),
               "features with ICC >= 0.75, automatic vs hand-drawn masks",
               "masks made (passed QC)"]
    rounds = sorted(int(r) for r in history)
    sites = sorted({s for r in history.values() for s in r})
    loss = {s: (rounds, [history[str(r)].get(s, {}).get("train_loss") for r in rounds])
            for s in sites}
    return {"architecture": seg.get("architecture"), "aggregator": seg.get("aggregator"),
            "rounds": seg.get("rounds"), "trained_on": seg.get("trained_on", {}),
            "volume_ml": seg.get("volume_ml", {}), "labels": labels, "rows": rows,
            "columns": columns, "headers": headers, "failed": seg.get("failed", {}),
            "figures": [{"title": "Segmentation: Dice + cross-entropy loss per site and round",
                         "src": plots.lines_figure(loss, "round", "training loss",
                                                   "local training")}] if rounds else []}


#: The models a site can use itself, among those the repeated splits summarize.
_USABLE = ("local", "federated", "federated_combat", "site_updated")


def repeats_section(repeats: dict[str, Any]) -> dict[str, Any]:
    """Each radiomics model's mean metric per site over the study's splits, with its SD and
    the number of splits, and the usable model with the highest mean (``repeats.json``)."""
    sites = repeats.get("sites", {})
    keys = [k for k in REPEATED_MODELS if any(k in models for models in sites.values())]

    def cell(value: dict[str, Any] | None) -> str:
        if not value:
            return "n/a"
        sd = "" if value["sd"] is None else f" ± {value['sd']:.3f}"
        return f"{value['mean']:.3f}{sd} ({value['n']})"

    rows = []
    for site, models in sites.items():
        best = max(((v["mean"], k) for k, v in models.items() if k in _USABLE), default=None)
        rows.append({"site": site, **{k: cell(models.get(k)) for k in keys},
                     "best": REPEATED_MODELS[best[1]] if best else "n/a"})
    stopped = repeats.get("stopped", {})
    finished = repeats.get("finished", 0)
    scored = {site: max((v["n"] for v in models.values() if v), default=0)
              for site, models in sites.items()}
    return {"metric": repeats.get("metric", ""), "finished": finished,
            "few": {site: n for site, n in scored.items() if n < finished},
            "total": repeats.get("finished", 0) + len(stopped),
            "stopped": {str(int(r) + 1): why for r, why in stopped.items()},
            "columns": ["site", *keys, "best"],
            "headers": ["site", *(REPEATED_MODELS[k] for k in keys), "highest mean"],
            "rows": rows}


def csv_rows(study: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's CSV: one row per site, feature set, model and metric."""
    rows = []
    for model in study.get("model", {}).get("models", []):
        features = "harmonized" if model["harmonized"] else "raw"
        for site, result in sorted(model["sites"].items()):
            for name, metrics in sorted(result["metrics"].items()):
                for metric, value in sorted(metrics.items()):
                    if not isinstance(value, list):
                        rows.append({"site": site, "features": features, "model": name,
                                     "metric": metric, "value": value})
    nomogram = study.get("nomogram") or {}
    for site, result in sorted(nomogram.get("sites", {}).items()):
        for name, metrics in sorted(result["metrics"].items()):
            for metric, value in sorted(metrics.items()):
                if not isinstance(value, list):
                    rows.append({"site": site, "features": "harmonized" if nomogram.get(
                        "harmonized") else "raw", "model": name, "metric": metric,
                        "value": value})
    for site, metrics in sorted((study.get("cnn") or {}).get("final", {}).items()):
        for metric, value in sorted(metrics.items()):
            rows.append({"site": site, "features": "image", "model": "cnn", "metric": metric,
                         "value": value})
    loso = (study.get("cnn") or {}).get("leave_site_out") or {}
    for site, metrics in sorted(loso.get("sites", {}).items()):
        for metric, value in sorted(metrics.items()):
            rows.append({"site": site, "features": "image", "model": "cnn leave-site-out",
                         "metric": metric, "value": value})
    segmentation = study.get("segmentation") or {}
    for model, results in (("segmentation", segmentation.get("final", {})),
                           ("segmentation leave-site-out",
                            (segmentation.get("leave_site_out") or {}).get("sites", {}))):
        for site, metrics in sorted(results.items()):
            for metric, value in sorted(metrics.items()):
                rows.append({"site": site, "features": "image", "model": model,
                             "metric": metric, "value": value})
    return rows


def harmony_section(harmony: dict[str, Any]) -> dict[str, Any]:
    """Harmony on the CNN's embeddings (``harmony.json``): the run, the scanners' mixing within
    its clusters before and after, and each site's own LISI of its scanners."""
    mixing = harmony.get("cluster_mixing", {})
    return {"status": harmony.get("status", "unknown"), "reason": harmony.get("reason", ""),
            "components": harmony.get("components"),
            "explained": (f"{harmony['explained']:.0%}" if harmony.get("explained") is not None
                          else "n/a"), "clusters": harmony.get("clusters"),
            "iterations": harmony.get("iterations"), "rounds": harmony.get("rounds"),
            "scanners": len(harmony.get("scanners", [])),
            "dropped": harmony.get("dropped", []), "failed": harmony.get("failed", {}),
            **{k: fmt(mixing.get(k)) for k in ("before", "after", "ceiling")},
            "rows": [{"site": site, "scanners": v["scanners"],
                      "LISI before": fmt(v["lisi_before"]), "LISI after": fmt(v["lisi_after"])}
                     for site, v in sorted(harmony.get("sites", {}).items())]}

