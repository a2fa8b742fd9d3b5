"""The report figures: matplotlib drawings returned as self-contained ``data:`` SVG images.

Every function takes aggregates only (metric values with CIs, binned curves, a matrix of AUCs,
per-round metrics), except :func:`roc_figure`, which a site draws from its own test rows for its
own report. Each returns a string for an ``<img src=...>``: the HTML then opens offline.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
           "#e377c2", "#7f7f7f", "#bcbd22")


def to_data_uri(fig: Figure) -> str:
    """The figure as a base64 SVG data URI (and the figure closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def forest_figure(rows: Sequence[tuple[str, float | None, float | None, float | None]],
                  pooled: tuple[float, float, float] | None, metric: str, title: str,
                  reference: float | None = 0.5) -> str:
    """Per-site estimates with their 95% CIs, and the pooled estimate as a diamond."""
    labels = [r[0] for r in rows] + (["pooled (random effects)"] if pooled else [])
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(labels) + 1.2))
    y = np.arange(len(labels))[::-1]
    # strict=False: y has one more row than ``rows`` when the pooled estimate is drawn
    for yi, (_, value, low, high) in zip(y, rows, strict=False):
        if value is None:
            continue
        if low is not None and high is not None and _finite(value, low, high):
            ax.plot([low, high], [yi, yi], color="black", lw=1.2)
            ax.plot(value, yi, "s", color=COLOURS[0], ms=7)
        elif _finite(value):
            ax.plot(value, yi, "s", color=COLOURS[0], ms=7)
    if pooled:
        est, low, high = pooled
        ax.fill([low, est, high, est], [y[-1], y[-1] + 0.25, y[-1], y[-1] - 0.25],
                color=COLOURS[1])
        ax.axvline(est, color=COLOURS[1], lw=0.8, ls=":")
    if reference is not None:
        ax.axvline(reference, color="grey", lw=0.8, ls="--")
    ax.set_yticks(y, labels)
    ax.set_xlabel(f"{metric} (95% CI)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return to_data_uri(fig)


def heatmap_figure(matrix: npt.ArrayLike, rows: Sequence[str], columns: Sequence[str], title: str,
                   label: str) -> str:
    """A matrix of metric values (NaN = not available) with the values written in the cells."""
    matrix = np.asarray(matrix, float)
    fig, ax = plt.subplots(figsize=(1.3 * len(columns) + 2.5, 0.6 * len(rows) + 1.5))
    shown = np.ma.masked_invalid(matrix)
    image = ax.imshow(shown, cmap="viridis", vmin=0.5 if label == "AUC" else -1, vmax=1,
                      aspect="auto")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            text = "n/a" if not math.isfinite(matrix[i, j]) else f"{matrix[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="white" if math.isfinite(matrix[i, j]) and matrix[i, j] < 0.8
                    else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("evaluated at")
    ax.set_ylabel("model")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=label)
    return to_data_uri(fig)


def calibration_figure(curves: Mapping[str, Sequence[Sequence[float]]], title: str) -> str:
    """Observed event rate against mean predicted risk per bin (``[n, risk, observed]`` rows),
    one line per curve; the diagonal is perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for k, (name, rows) in enumerate(curves.items()):
        if rows:
            _, risk, observed = np.asarray(rows, float).T
            ax.plot(risk, observed, "o-", color=COLOURS[k % len(COLOURS)], label=name, ms=4)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted risk (bin mean)")
    ax.set_ylabel("observed rate")
    ax.set_title(title, fontsize=10)
    if any(curves.values()):
        ax.legend(fontsize=8)
    return to_data_uri(fig)


def decision_figure(curves: Mapping[str, Sequence[Sequence[float]]], title: str) -> str:
    """Net benefit against threshold probability (``[threshold, model, treat_all]`` rows): each
    curve's model (solid, a dot at each threshold the site sent a value for; NaN where it
    withheld one) and treating all of its patients (dashed, same colour)."""
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    top = 0.05
    for k, (name, rows) in enumerate(curves.items()):
        if rows:
            pt, model, everyone = np.asarray(rows, float).T
            colour = COLOURS[k % len(COLOURS)]
            ax.plot(pt, model, color=colour, marker="o", ms=3, label=name)
            ax.plot(pt, everyone, color=colour, ls="--", lw=0.8, label=f"{name}: treat all")
            top = max([top, *model[np.isfinite(model)], *everyone[np.isfinite(everyone)]])
    ax.axhline(0, color="black", lw=0.8, label="treat none")
    ax.set_ylim(-0.05, top * 1.1)
    ax.set_xlabel("threshold probability")
    ax.set_ylabel("net benefit")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return to_data_uri(fig)


def lines_figure(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str,
                 ylabel: str, title: str, log_x: bool = False) -> str:
    """Several named (x, y) lines: training curves per site and round, a CV loss path."""
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for k, (name, (x, y)) in enumerate(series.items()):
        ax.plot(x, [np.nan if v is None else v for v in y], "o-", ms=3,
                color=COLOURS[k % len(COLOURS)], label=name)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return to_data_uri(fig)


def kaplan_meier_figure(row: Mapping[str, Any], title: str) -> str | None:
    """A survival metrics row's Kaplan-Meier curves by predicted risk group, on its fixed grid
    (each group's size at the start in its label); None without curves."""
    curves = row.get("kaplan_meier") or {}
    if not curves:
        return None
    series = {f"{group} risk ({curve['at_risk'][0]} at start)": (row["grid"], curve["survival"])
              for group, curve in curves.items()}
    return lines_figure(series, "months", "event-free survival", title)


def bars_figure(values: Mapping[str, float], xlabel: str, title: str) -> str:
    """Horizontal bars, e.g. standardized coefficients of the selected features."""
    names = list(values)[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.32 * len(names) + 1.2))
    v = [values[n] for n in names]
    ax.barh(range(len(names)), v, color=[COLOURS[0] if x >= 0 else COLOURS[1] for x in v])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    return to_data_uri(fig)


def roc_figure(curves: Mapping[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float]],
               title: str) -> str:
    """ROC curves (false and true positive rates) with their AUC in the legend: for a site's own
    report only, since the curve's corners are its patients."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for k, (name, (fpr, tpr, auc)) in enumerate(curves.items()):
        ax.step(fpr, tpr, where="post", color=COLOURS[k % len(COLOURS)],
                label=f"{name} (AUC {auc:.2f})")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return to_data_uri(fig)


def nomogram_axes(coefficients: Mapping[str, float],
                  continuous: Callable[[str], Sequence[tuple[str, float]]]
                  ) -> dict[str, tuple[float, Sequence[tuple[str, float]]]]:
    """Each nomogram term's coefficient and axis ticks, for :func:`nomogram_figure`: the
    radiomics score (a logit) from -4 to 4, a categorical level's indicator (``stage=II``) as
    no/yes, and a continuous factor over the ticks ``continuous(term)`` gives."""
    terms = {}
    for term, coef in coefficients.items():
        if term == "radiomics score":
            ticks: Sequence[tuple[str, float]] = [(f"{v:g}", float(v)) for v in (-4, -2, 0, 2, 4)]
        elif "=" in term:
            ticks = [("no", 0.0), ("yes", 1.0)]
        else:
            ticks = continuous(term)
        terms[term] = (coef, ticks)
    return terms


def nomogram_figure(terms: Mapping[str, tuple[float, Sequence[tuple[str, float]]]],
                    intercept: float, title: str,
                    outcomes: Sequence[tuple[str, Callable[[float], float]]] = (
                        ("predicted risk", lambda r: math.log(r / (1 - r))),)) -> str:
    """A points nomogram of a linear predictor. ``terms`` maps each term to its coefficient and
    the (label, value) ticks of its axis; the term with the widest effect spans 0-100 points,
    and the bottom axes read total points as each of ``outcomes``: a name and the linear
    predictor at which the outcome has a probability (a logistic model's risk by default; a Cox
    model's survival at a time, ``log(log(s) / log(S0(t)))``)."""
    spans = {t: abs(c) * (max(v for _, v in ticks) - min(v for _, v in ticks))
             for t, (c, ticks) in terms.items()}
    widest = max(spans.values()) or 1.0
    per_unit = 100.0 / widest
    fig, ax = plt.subplots(figsize=(7.5, 0.7 * (len(terms) + 2 + len(outcomes))))
    rows = len(terms) + 1 + len(outcomes)

    def axis(y: float, ticks: Sequence[tuple[str, float]], name: str) -> None:
        xs = [x for _, x in ticks]
        ax.plot([min(xs), max(xs)], [y, y], color="black", lw=1)
        for label, x in ticks:
            ax.plot([x, x], [y, y + 0.12], color="black", lw=1)
            ax.text(x, y + 0.18, label, ha="center", va="bottom", fontsize=7)
        ax.text(-8, y, name, ha="right", va="center", fontsize=9)

    axis(rows, [(str(p), float(p)) for p in range(0, 101, 10)], "points")
    low_total = 0.0
    for k, (term, (coef, ticks)) in enumerate(terms.items()):
        values = [v for _, v in ticks]
        base = min(values) if coef >= 0 else max(values)
        low_total += coef * base
        axis(rows - 1 - k, [(label, (v - base) * coef * per_unit) for label, v in ticks], term)
    total_max = sum(spans.values()) * per_unit
    axis(len(outcomes), [(f"{p:.0f}", p * 100 / max(total_max, 1e-9))
                         for p in np.linspace(0, total_max, 6)], "total points")
    for k, (name, linear_predictor) in enumerate(outcomes):
        ticks = []
        for r in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
            points = (linear_predictor(r) - intercept - low_total) * per_unit
            if 0 <= points <= total_max:
                ticks.append((f"{r:.2f}", points * 100 / max(total_max, 1e-9)))
        if ticks:
            axis(len(outcomes) - 1 - k, ticks, name)
    ax.set_xlim(-40, 105)
    ax.set_ylim(-0.6, rows + 0.8)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    return to_data_uri(fig)


def scatter_figure(series: Mapping[str, Sequence[Sequence[float]]], title: str) -> str:
    """Predicted against measured values (``[measured, predicted]`` per model) with the identity
    line: for a site's own report only (the points are its patients)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    low, high = math.inf, -math.inf
    for k, (name, (measured, predicted)) in enumerate(series.items()):
        ax.scatter(measured, predicted, s=12, alpha=0.7, color=COLOURS[k % len(COLOURS)],
                   label=name)
        low = min(low, min(measured), min(predicted))
        high = max(high, max(measured), max(predicted))
    if math.isfinite(low):
        ax.plot([low, high], [low, high], color="grey", ls="--", lw=0.8)
    ax.set_xlabel("measured")
    ax.set_ylabel("predicted")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return to_data_uri(fig)


def cam_figure(crop: npt.NDArray[np.floating[Any]], cam: npt.NDArray[np.floating[Any]],
               title: str) -> str:
    """A crop's middle axial slice with its Grad-CAM map over it (site report only: it is a
    patient's image)."""
    k = crop.shape[0] // 2
    fig, axes = plt.subplots(1, 2, figsize=(5.2, 2.8))
    axes[0].imshow(crop[k], cmap="gray")
    axes[1].imshow(crop[k], cmap="gray")
    axes[1].imshow(cam[k], cmap="jet", alpha=0.4, vmin=0, vmax=1)
    for ax, name in zip(axes, ("crop", "Grad-CAM"), strict=True):
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return to_data_uri(fig)


def contour_figure(image: npt.NDArray[np.floating[Any]], drawn: npt.NDArray[np.integer[Any]],
                   made: npt.NDArray[np.integer[Any]], labels: Sequence[int], title: str) -> str:
    """One axial slice with the hand-drawn mask's contours (solid) and the network's (dashed),
    one colour per label (site report only: it is a patient's image)."""
    fig, ax = plt.subplots(figsize=(3.6, 3.6))
    ax.imshow(image, cmap="gray")
    colours = ("#d62728", "#2ca02c", "#1f77b4", "#ff7f0e")
    for index, value in enumerate(labels):
        colour = colours[index % len(colours)]
        for mask, style in ((drawn, "solid"), (made, "dashed")):
            if (mask == value).any():
                ax.contour(mask == value, levels=[0.5], colors=colour, linewidths=1.0,
                           linestyles=style)
    ax.axis("off")
    ax.set_title(title, fontsize=8)
    return to_data_uri(fig)
