"""The validation, the coordinator's side: each site's test metrics of every model, checked
(a malformed table excludes its site, by name), side by side and pooled across sites
(random effects, with I-squared); the demo's summary table."""

from __future__ import annotations

import json
import math
from typing import Any

from common.metrics.pooling import pool_random_effects
from common.metrics.survival import RISK_GROUPS
from common.metrics.tables import HEADLINE
from common.payloads import ModelMetrics
from common.templates import fmt


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{v!r} is not a number")
    return None if v != v else float(v)


def _cell(v: object) -> float | str | None:
    """A number of a curve's row, or the risk group a survival calibration row is of."""
    if isinstance(v, str) and v in RISK_GROUPS:
        return v
    return _number(v)


def _group(v: object) -> str:
    if not isinstance(v, str) or v not in RISK_GROUPS:
        raise TypeError(f"{v!r} is not a risk group")
    return v


def _metric_value(v: object) -> object:
    """A number (None = NaN); a curve: rows of numbers (a survival calibration row also names
    its risk group); a flat list of numbers (the Kaplan-Meier grid); or per risk group its
    Kaplan-Meier curve (``survival``: numbers, ``at_risk``: counts, None where withheld)."""
    if isinstance(v, dict):
        return {_group(group): {
            "survival": [_number(x) for x in curve["survival"]],
            "at_risk": [None if x is None else _number(x) for x in curve["at_risk"]]}
            for group, curve in v.items()}
    if isinstance(v, list):
        return [[_cell(x) for x in row] if isinstance(row, list) else _number(row)
                for row in v]
    return _number(v)


def _metrics_table(reply: ModelMetrics, site: str, failed: dict[str, str]
                   ) -> dict[str, Any]:
    """A site's metrics JSON, checked: model names to metric names to numbers (None = NaN) or
    binned curves, the paired comparisons, and (where the site updated the federated model)
    the candidate its cross-validation chose with each candidate's deviance. A malformed table
    excludes the site, named."""
    try:
        table = json.loads(reply.table)
        out: dict[str, Any] = {
            "metrics": {str(model): {str(k): _metric_value(v) for k, v in row.items()}
                        for model, row in table["models"].items()},
            "comparisons": {str(name): {str(k): _number(v) for k, v in row.items()}
                            for name, row in table.get("comparisons", {}).items()}}
        if "update" in table:
            update = table["update"]
            out["update"] = {"choice": str(update["choice"]), "deviance": {
                str(k): _number(v) if v is not None else None
                for k, v in update["deviance"].items()}}
        return out
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        failed[site] = f"model metrics: malformed table ({exc!r})"
        return {"metrics": {}, "comparisons": {}}


def site_results(metrics: dict[str, ModelMetrics], failed: dict[str, str]
                  ) -> dict[str, dict[str, object]]:
    """Each site's test counts, metrics per model, paired comparisons and (where it updated the
    federated model) its update's choice (model.json, nomogram.json)."""
    return {site: {"n_test": m.n_test, "n_positive": m.n_positive,
                   **_metrics_table(m, site, failed)}
            for site, m in sorted(metrics.items())}


#: The models pooled across sites in the multicentre summary: the federated model, the federated
#: model each site updated on its own rows, the model trained without the site, and each site's
#: own local model (``local <site>`` at that site).
POOLED_MODELS = ("federated", "site-updated", "leave-site-out", "local", "nomogram",
                 "nomogram leave-site-out")


def pool_sites(sites: dict[str, dict[str, Any]], loss: str) -> dict[str, dict[str, Any]]:
    """Per model, the sites' headline metric side by side and their random-effects pooled
    estimate with I-squared (:func:`common.metrics.pooling.pool_random_effects`): AUC with its
    DeLong variance (classification), Pearson r on Fisher's z with variance 1/(n - 3)
    (regression), or Harrell's C with its bootstrap variance (survival).
    A site whose metric is undefined is listed but not pooled; fewer than two sites: no pool."""
    out = {}
    for kind in POOLED_MODELS:
        rows = {}
        for site, result in sorted(sites.items()):
            row = result.get("metrics", {}).get(f"local {site}" if kind == "local" else kind)
            if row is None:
                continue
            if loss == "logistic":
                value, low, high, var = (row.get(k) for k in ("auc", "auc_low", "auc_high",
                                                              "auc_variance"))
            elif loss == "cox":  # Harrell's C with its bootstrap variance
                value, low, high, se = (row.get(k) for k in ("c_harrell", "c_harrell_low",
                                                             "c_harrell_high", "c_harrell_se"))
                var = se**2 if isinstance(se, float) and math.isfinite(se) else None
            else:
                value, low, high = row.get("r"), row.get("r_low"), row.get("r_high")
                n = result.get("n_test", 0)
                var = 1.0 / (n - 3) if n > 3 and value is not None and abs(value) < 1 else None
            rows[site] = {"value": value, "low": low, "high": high, "variance": var}
        usable = {s: r for s, r in rows.items()
                  if r["value"] is not None and r["variance"] is not None and r["variance"] > 0}
        pooled = None
        if len(usable) >= 2:
            values = [r["value"] for r in usable.values()]
            fisher = loss == "gaussian"  # Pearson r pools on Fisher's z
            if fisher:
                values = [math.atanh(v) for v in values]
            p = pool_random_effects(values, [r["variance"] for r in usable.values()])
            back = math.tanh if fisher else (lambda v: v)
            pooled = {"estimate": back(p.estimate), "low": back(p.low), "high": back(p.high),
                      "tau2": p.tau2, "q": p.q, "i2": p.i2, "p_heterogeneity": p.p_value,
                      "sites": sorted(usable)}
        if rows:
            out[kind] = {"metric": HEADLINE[loss][0], "sites": rows, "pooled": pooled}
    return out


def summary_rows(models: list[dict[str, Any]], cnn: dict[str, Any] | None = None,
                 nomogram: dict[str, Any] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The demo's table from ``model.json``'s models (and ``cnn.json``): per site, its test size
    and the headline metric (AUC, or Pearson r for regression) of its local-only model, the
    federated model and the model trained without it, on raw features and after federated
    ComBat, the federated model the site updated (after ComBat where it ran), the federated
    nomogram's, the site's local-only CNN's, the CNN trained without it and the final federated
    CNN's."""
    raw = next((m for m in models if not m["harmonized"]), None)
    combat = next((m for m in models if m["harmonized"]), None)
    metric = HEADLINE[(raw or combat or {}).get("loss", "gaussian")][0]

    def value(model: dict[str, Any] | None, site: str, name: str) -> float | None:
        if model is None:
            return None
        return model["sites"].get(site, {}).get("metrics", {}).get(name, {}).get(metric)

    cnn_metric = "auc" if metric == "auc" else "pearson_r"  # the CNN's names: test_auc, ...
    final = (cnn or {}).get("final", {})
    left_out = ((cnn or {}).get("leave_site_out") or {}).get("sites", {})
    sites = sorted({s for m in models for s in m["sites"]})
    rows = []
    for site in sites:
        any_model = raw if raw and site in raw["sites"] else combat
        rows.append({
            "site": site, "n_test": any_model["sites"][site]["n_test"] if any_model else 0,
            "local": value(raw, site, f"local {site}"), "federated": value(raw, site, "federated"),
            "federated_combat": value(combat, site, "federated"),
            "site_updated": value(combat or raw, site, "site-updated"),
            "leave_site_out": value(raw, site, "leave-site-out"),
            "leave_site_out_combat": value(combat, site, "leave-site-out"),
            "nomogram": (nomogram or {}).get("sites", {}).get(site, {}).get(
                "metrics", {}).get("nomogram", {}).get(metric),
            **{key: final.get(site, {}).get(f"{prefix}test_{cnn_metric}")
               for key, prefix in (("cnn_local", "local_"), ("cnn_finetuned", "finetuned_"),
                                   ("cnn_updated", "updated_"), ("cnn", ""))},
            "cnn_left_out": left_out.get(site, {}).get(f"test_{cnn_metric}")})
    return metric, rows


def recommendation(update: dict[str, Any] | None) -> str:
    """The model a site should use, and why: what its own cross-validation chose among the
    federated model, its updates and the site's local model (:mod:`common.selection.updating`),
    by held-out deviance on its training rows, never by its test rows. Empty without an
    update."""
    if not update:
        return ""
    choice, deviance = update["choice"], update.get("deviance") or {}
    what = {"federated": "the federated model as it is", "local": "its local-only model",
            "recalibrated": "the federated model recalibrated (intercept and slope)"}.get(
                choice, f"the federated model revised (its coefficients refitted with an L2 "
                f"penalty of {choice.removeprefix('revised ')} x the rows towards them)")
    scores = ", ".join(f"{name} {'not fitted' if value is None else fmt(value, 1)}"
                       for name, value in deviance.items()
                       if name in ("federated", "recalibrated", "local") or name == choice)
    return f"{what}: the least cross-validated deviance ({scores})" if scores else what


#: The radiomics models the repeated splits summarize (keys of :func:`summary_rows`), with
#: the report's names for them.
REPEATED_MODELS = {"local": "site alone", "federated": "federated",
                   "federated_combat": "federated + ComBat", "site_updated": "site-updated",
                   "leave_site_out": "left out", "leave_site_out_combat": "left out + ComBat",
                   "nomogram": "nomogram"}


def repeat_summary(splits: list[tuple[list[dict[str, Any]], dict[str, Any] | None]],
                   stopped: dict[int, str]) -> dict[str, Any]:
    """Each radiomics model's headline test metric per site over the study's splits
    (``validation.repeats``): its mean, standard deviation and the number of splits that scored
    it (a split whose test rows at the site hold one class scores none). ``splits`` holds each
    finished split's ``model.json`` models and its nomogram; ``stopped`` why the others did
    not finish."""
    values: dict[str, dict[str, list[float]]] = {}
    metric = ""
    for models, nomogram in splits:
        metric, rows = summary_rows(models, None, nomogram)
        for row in rows:
            for key in REPEATED_MODELS:
                value = row.get(key)
                if value is not None and math.isfinite(value):
                    values.setdefault(row["site"], {}).setdefault(key, []).append(float(value))

    def spread(found: list[float]) -> dict[str, float | int | None]:
        mean = sum(found) / len(found)
        sd = (math.sqrt(sum((v - mean) ** 2 for v in found) / (len(found) - 1))
              if len(found) > 1 else None)
        return {"mean": mean, "sd": sd, "n": len(found)}

    return {"metric": metric, "finished": len(splits),
            "stopped": {str(r): why for r, why in sorted(stopped.items())},
            "sites": {site: {key: spread(found) for key, found in by_model.items()}
                      for site, by_model in sorted(values.items())}}
