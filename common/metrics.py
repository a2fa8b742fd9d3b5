"""Validation metrics of a study: pure functions of labels and scores, with confidence intervals.

What a TRIPOD-style results table reports, computed where the scores are (a site's own test
rows); only the values returned here, and binned curves whose every bin holds at least the
protocol's minimum count, leave a site.

* **Discrimination**: AUC with its DeLong variance (the fast midrank algorithm of Sun & Xu,
  IEEE SPL 2014) and 95% CI, a stratified bootstrap CI, and DeLong's paired test of two models on
  the same patients (DeLong, DeLong & Clarke-Pearson, Biometrics 1988).
* **Classification at a threshold**: sensitivity, specificity, PPV, NPV, accuracy, F1 and the
  confusion matrix. The threshold is fixed on training data: :func:`youden_threshold` on a
  training table, or the training prevalence for a calibrated risk model (where the two agree:
  Youden's J is largest where the class densities are equal, which for a calibrated risk is
  where the risk equals the prevalence).
* **Calibration**: Brier score, calibration intercept (calibration-in-the-large, slope fixed at
  one) and slope by logistic recalibration (Cox 1958; Van Calster et al., JCE 2016), the
  calibration curve in bins of at least ``min_count`` patients.
* **Clinical utility**: the decision curve, net benefit against treat-all (Vickers & Elkin 2006).
* **Regression** (plasma-cell infiltration): Pearson and Spearman r with Fisher-z CIs (Bonett &
  Wright's variance for Spearman), MAE, RMSE, Bland-Altman bias and 95% limits of agreement.
* **Across sites**: the DerSimonian-Laird random-effects pooled estimate with its CI, Cochran's
  Q and I-squared (Higgins & Thompson 2002), for the forest plot of per-site AUCs.

Scores for the threshold and calibration metrics are predicted risks in (0, 1); AUC takes any
score. Arrays are 1-D, one value a patient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, ParamSpec, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt
from scipy import special, stats

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

FloatArray: TypeAlias = npt.NDArray[np.float64]
P = ParamSpec("P")
R = TypeVar("R")

Z95 = float(stats.norm.ppf(0.975))


def _binary(y: npt.ArrayLike, score: npt.ArrayLike, what: str) -> tuple[FloatArray, FloatArray]:
    y = np.asarray(y, dtype=float).ravel()
    score = np.asarray(score, dtype=float).ravel()
    if y.shape != score.shape:
        raise ValueError(f"{what}: {len(y)} labels for {len(score)} scores")
    if not np.all(np.isin(y, (0.0, 1.0))):
        raise ValueError(f"{what}: labels must be 0 or 1")
    if not np.all(np.isfinite(score)):
        raise ValueError(f"{what}: scores hold missing or infinite values")
    return y, score


def _midranks(x: FloatArray) -> FloatArray:
    """1-based ranks with ties given their mean rank."""
    ranks: FloatArray = stats.rankdata(x, method="average")
    return ranks


@dataclass(frozen=True)
class Auc:
    """An AUC with its DeLong variance and 95% CI (clipped to [0, 1], as pROC does)."""

    auc: float
    variance: float
    low: float
    high: float
    n_positive: int
    n_negative: int


def _delong_components(y: FloatArray, scores: FloatArray
                       ) -> tuple[FloatArray, FloatArray, FloatArray]:
    """AUCs (k,) and the structural components V10 (k, m) and V01 (k, n) of ``scores`` (k, N)
    by Sun & Xu's midrank formulation."""
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    v10 = np.empty((scores.shape[0], m))
    v01 = np.empty((scores.shape[0], n))
    aucs = np.empty(scores.shape[0])
    for k, s in enumerate(scores):
        tx, ty, tz = _midranks(s[pos]), _midranks(s[neg]), _midranks(np.concatenate(
            [s[pos], s[neg]]))
        aucs[k] = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
        v10[k] = (tz[:m] - tx) / n
        v01[k] = 1.0 - (tz[m:] - ty) / m
    return aucs, v10, v01


def _delong_covariance(y: FloatArray, scores: FloatArray) -> tuple[FloatArray, FloatArray]:
    aucs, v10, v01 = _delong_components(y, scores)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(aucs), len(aucs)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(aucs), len(aucs)))
    return aucs, s10 / m + s01 / n


def auc_delong(y: npt.ArrayLike, score: npt.ArrayLike) -> Auc:
    """The AUC and its DeLong variance and 95% CI. Needs both classes."""
    y, score = _binary(y, score, "AUC")
    m, n = int(y.sum()), int((1 - y).sum())
    if m == 0 or n == 0:
        raise ValueError(f"AUC: needs both classes, got {m} positive and {n} negative")
    aucs, cov = _delong_covariance(y, score[None, :])
    auc, var = float(aucs[0]), float(cov[0, 0])
    half = Z95 * math.sqrt(max(var, 0.0))
    return Auc(auc, var, max(0.0, auc - half), min(1.0, auc + half), m, n)


@dataclass(frozen=True)
class PairedTest:
    """DeLong's test of two correlated AUCs (same patients): difference a - b, z and p."""

    auc_a: float
    auc_b: float
    difference: float
    z: float
    p_value: float


def delong_test(y: npt.ArrayLike, score_a: npt.ArrayLike, score_b: npt.ArrayLike) -> PairedTest:
    """Two-sided DeLong test of AUC(a) = AUC(b) on the same patients."""
    y, score_a = _binary(y, score_a, "DeLong test")
    _, score_b = _binary(y, score_b, "DeLong test")
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError("DeLong test: needs both classes")
    aucs, cov = _delong_covariance(y, np.vstack([score_a, score_b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 0:  # identical rankings: no evidence of a difference
        return PairedTest(float(aucs[0]), float(aucs[1]), diff, 0.0, 1.0)
    z = diff / math.sqrt(var)
    return PairedTest(float(aucs[0]), float(aucs[1]), diff, z, float(2 * stats.norm.sf(abs(z))))


def auc_bootstrap_ci(y: npt.ArrayLike, score: npt.ArrayLike, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the AUC from a bootstrap stratified by class (each resample keeps the
    numbers of positives and negatives)."""
    y, score = _binary(y, score, "bootstrap AUC")
    pos, neg = score[y == 1], score[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("bootstrap AUC: needs both classes")
    rng = np.random.default_rng(seed)
    p = pos[rng.integers(0, len(pos), (n_boot, len(pos)))]
    q = neg[rng.integers(0, len(neg), (n_boot, len(neg)))]
    # Mann-Whitney by sorting each resample's negatives: P(pos > neg) + 0.5 P(pos = neg)
    q.sort(axis=1)
    below = np.stack([np.searchsorted(q[b], p[b], side="left") for b in range(n_boot)])
    upto = np.stack([np.searchsorted(q[b], p[b], side="right") for b in range(n_boot)])
    aucs = (below + upto).sum(axis=1) / (2.0 * len(pos) * len(neg))
    tail = (1 - level) / 2
    low, high = np.quantile(aucs, [tail, 1 - tail])
    return float(low), float(high)


# --- at a threshold --------------------------------------------------------------------------

def youden_threshold(y: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """The score cut-off maximizing sensitivity + specificity - 1 on (training) data; a case is
    positive when its score is >= the cut-off. Ties in J: the highest cut-off."""
    y, score = _binary(y, score, "Youden threshold")
    m, n = y.sum(), (1 - y).sum()
    if m == 0 or n == 0:
        raise ValueError("Youden threshold: needs both classes")
    cuts = np.unique(score)
    pos_sorted, neg_sorted = np.sort(score[y == 1]), np.sort(score[y == 0])
    tp = m - np.searchsorted(pos_sorted, cuts, side="left")
    tn = np.searchsorted(neg_sorted, cuts, side="left")
    j = tp / m + tn / n - 1
    return float(cuts[np.flatnonzero(j == j.max())[-1]])


@dataclass(frozen=True)
class AtThreshold:
    """Classification of test rows at a fixed cut-off (score >= threshold is positive)."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    accuracy: float
    f1: float


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def at_threshold(y: npt.ArrayLike, score: npt.ArrayLike, threshold: float) -> AtThreshold:
    y, score = _binary(y, score, "threshold metrics")
    predicted = score >= threshold
    tp = int(np.sum(predicted & (y == 1)))
    fp = int(np.sum(predicted & (y == 0)))
    tn = int(np.sum(~predicted & (y == 0)))
    fn = int(np.sum(~predicted & (y == 1)))
    return AtThreshold(float(threshold), tp, fp, tn, fn, _ratio(tp, tp + fn), _ratio(tn, tn + fp),
                       _ratio(tp, tp + fp), _ratio(tn, tn + fn), _ratio(tp + tn, len(y)),
                       _ratio(2 * tp, 2 * tp + fp + fn))


# --- calibration and utility -----------------------------------------------------------------

def _risk(p: FloatArray, what: str) -> FloatArray:
    if np.any((p <= 0) | (p >= 1)):
        raise ValueError(f"{what}: risks must lie strictly between 0 and 1")
    return p


def brier_score(y: npt.ArrayLike, risk: npt.ArrayLike) -> float:
    y, risk = _binary(y, risk, "Brier score")
    return float(np.mean((risk - y) ** 2))


def _logistic_fit(y: FloatArray, x: FloatArray, offset: FloatArray) -> FloatArray:
    """Unpenalized maximum likelihood of y ~ x (columns) + offset, by Newton's method."""
    beta = np.zeros(x.shape[1])
    for _ in range(100):
        eta = x @ beta + offset
        p = special.expit(eta)  # overflow-free for a large |eta|
        grad = x.T @ (y - p)
        hess = (x * (p * (1 - p))[:, None]).T @ x
        step = np.linalg.solve(hess, grad)
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10:
            return beta
    raise ValueError("calibration: logistic recalibration did not converge (separable data)")


@dataclass(frozen=True)
class Calibration:
    """Calibration intercept (slope fixed at 1; 0 is ideal) and slope (1 is ideal)."""

    intercept: float
    slope: float


def calibration(y: npt.ArrayLike, risk: npt.ArrayLike) -> Calibration:
    """Logistic recalibration of predicted risks on observed outcomes."""
    y, risk = _binary(y, risk, "calibration")
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError("calibration: needs both classes")
    lp = np.log(_risk(risk, "calibration") / (1 - risk))
    intercept = _logistic_fit(y, np.ones((len(y), 1)), lp)[0]
    slope = _logistic_fit(y, np.column_stack([np.ones(len(y)), lp]), np.zeros(len(y)))[1]
    return Calibration(float(intercept), float(slope))


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of the calibration curve: its patients' mean risk and observed event rate."""

    n: int
    mean_risk: float
    observed: float


def calibration_curve(y: npt.ArrayLike, risk: npt.ArrayLike, n_bins: int = 10, min_count: int = 5
                      ) -> list[CalibrationBin]:
    """Bins of equal size by predicted risk (at most ``n_bins``, each of at least ``min_count``
    patients; fewer bins when the rows are few). Fewer than ``min_count`` rows: no curve."""
    y, risk = _binary(y, risk, "calibration curve")
    if min_count < 1 or n_bins < 1:
        raise ValueError("calibration curve: n_bins and min_count must be >= 1")
    k = min(n_bins, len(y) // min_count)
    if k == 0:
        return []
    order = np.argsort(risk, kind="stable")
    return [CalibrationBin(len(part), float(risk[part].mean()), float(y[part].mean()))
            for part in np.array_split(order, k)]


@dataclass(frozen=True)
class DecisionPoint:
    """Net benefit at a threshold probability: the model, and treating every patient."""

    threshold: float
    model: float
    treat_all: float


def decision_curve(y: npt.ArrayLike, risk: npt.ArrayLike,
                   thresholds: Sequence[float] = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2)),
                   min_count: int = 1) -> list[DecisionPoint]:
    """Net benefit = TP/N - FP/N x pt / (1 - pt) at threshold probabilities pt.

    Net benefit at two thresholds gives the positives and negatives whose risk lies between
    them, so the model's net benefit is NaN at every threshold that would tell apart a group of
    fewer than ``min_count`` patients (:func:`coarse_thresholds`): a curve never splits off
    fewer patients than a calibration bin holds. Every threshold keeps its point (treating all
    depends on the prevalence only), so the curve's length is the protocol's, not the data's."""
    y, risk = _binary(y, risk, "decision curve")
    n, prevalence = len(y), float(y.mean())
    for pt in thresholds:
        if not 0 < pt < 1:
            raise ValueError(f"decision curve: threshold {pt} is not strictly between 0 and 1")
    kept = set(coarse_thresholds(risk, thresholds, min_count))
    points = []
    for pt in thresholds:
        odds = pt / (1 - pt)
        treat = risk >= pt
        tp, fp = np.sum(treat & (y == 1)), np.sum(treat & (y == 0))
        model = float(tp / n - fp / n * odds) if float(pt) in kept else NAN
        points.append(DecisionPoint(float(pt), model,
                                    float(prevalence - (1 - prevalence) * odds)))
    return points


def coarse_thresholds(risk: npt.ArrayLike, thresholds: Sequence[float], min_count: int
                      ) -> list[float]:
    """The ascending ``thresholds`` to keep so that the patients below the first, between any
    two consecutive ones and at or above the last number 0 or at least ``min_count`` (greedy
    from the lowest: a threshold is kept when the group it closes and the group above it both
    qualify)."""
    risk = np.sort(np.asarray(risk, float))

    def ok(count: int) -> bool:
        return count == 0 or count >= min_count

    kept: list[float] = []
    below = 0  # patients under the last kept threshold
    for pt in sorted(set(float(t) for t in thresholds)):
        under = int(np.searchsorted(risk, pt, side="left"))  # risk < pt
        if ok(under - below) and ok(len(risk) - under):
            kept.append(pt)
            below = under
    return kept


# --- regression ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Correlation:
    r: float
    low: float
    high: float
    p_value: float


def _fisher_ci(r: float, se: float) -> tuple[float, float]:
    z = math.atanh(max(min(r, 1 - 1e-15), -1 + 1e-15))
    return math.tanh(z - Z95 * se), math.tanh(z + Z95 * se)


def pearson(y: npt.ArrayLike, prediction: npt.ArrayLike) -> Correlation:
    """Pearson r with its Fisher-z 95% CI (needs 4 or more rows)."""
    y, prediction = np.asarray(y, float), np.asarray(prediction, float)
    if len(y) < 4:
        raise ValueError(f"Pearson r: needs at least 4 rows, got {len(y)}")
    result = stats.pearsonr(prediction, y)
    low, high = _fisher_ci(float(result.statistic), 1 / math.sqrt(len(y) - 3))
    return Correlation(float(result.statistic), low, high, float(result.pvalue))


def spearman(y: npt.ArrayLike, prediction: npt.ArrayLike) -> Correlation:
    """Spearman rho with a Fisher-z 95% CI using Bonett & Wright's variance (1 + rho^2/2)/(n-3)."""
    y, prediction = np.asarray(y, float), np.asarray(prediction, float)
    if len(y) < 4:
        raise ValueError(f"Spearman rho: needs at least 4 rows, got {len(y)}")
    result = stats.spearmanr(prediction, y)
    rho = float(result.statistic)
    low, high = _fisher_ci(rho, math.sqrt((1 + rho**2 / 2) / (len(y) - 3)))
    return Correlation(rho, low, high, float(result.pvalue))


@dataclass(frozen=True)
class Agreement:
    """Bland-Altman: mean difference (prediction - truth) and its 95% limits of agreement."""

    bias: float
    sd: float
    lower: float
    upper: float


def bland_altman(y: npt.ArrayLike, prediction: npt.ArrayLike) -> Agreement:
    d = np.asarray(prediction, float) - np.asarray(y, float)
    if len(d) < 2:
        raise ValueError("Bland-Altman: needs at least 2 rows")
    bias, sd = float(d.mean()), float(d.std(ddof=1))
    return Agreement(bias, sd, bias - Z95 * sd, bias + Z95 * sd)


# --- across sites ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Pooled:
    """The random-effects (DerSimonian-Laird) pooled estimate and the heterogeneity of k sites."""

    estimate: float
    low: float
    high: float
    tau2: float
    q: float
    i2: float        # share of the variation due to heterogeneity, 0..1
    p_value: float   # Cochran's Q test of homogeneity
    k: int


def pool_random_effects(estimates: Sequence[float], variances: Sequence[float]) -> Pooled:
    """DerSimonian-Laird pooling of per-site estimates (e.g. AUCs with their DeLong variances)."""
    est, var = np.asarray(estimates, float), np.asarray(variances, float)
    if len(est) != len(var) or len(est) < 2:
        raise ValueError("pooling: needs two or more estimates, each with its variance")
    if np.any(var <= 0) or not np.all(np.isfinite(est)):
        raise ValueError("pooling: every variance must be positive and every estimate finite")
    w = 1 / var
    fixed = float(np.sum(w * est) / w.sum())
    q = float(np.sum(w * (est - fixed) ** 2))
    df = len(est) - 1
    tau2 = max(0.0, (q - df) / (w.sum() - np.sum(w**2) / w.sum()))
    w_star = 1 / (var + tau2)
    pooled = float(np.sum(w_star * est) / w_star.sum())
    se = math.sqrt(1 / w_star.sum())
    i2 = max(0.0, (q - df) / q) if q > 0 else 0.0
    return Pooled(pooled, pooled - Z95 * se, pooled + Z95 * se, float(tau2), q, i2,
                  float(stats.chi2.sf(q, df)), len(est))


# --- a model's metrics on a site's test rows ---------------------------------------------------

NAN = float("nan")


def _nan_if_fails(compute: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R | None:
    """``compute(*args, **kwargs)``, or None where it refuses its input (ValueError)."""
    try:
        return compute(*args, **kwargs)
    except ValueError:
        return None


def risk_of(score: npt.ArrayLike) -> FloatArray:
    """A logistic model's linear predictor as a risk, kept inside (0, 1)."""
    risk: FloatArray = np.clip(special.expit(np.asarray(score, float)), 1e-12, 1 - 1e-12)
    return risk


def classification_table(y: npt.ArrayLike, score: npt.ArrayLike, threshold: float, *,
                         min_count: int = 5, n_bins: int = 10, bootstrap: int = 1000,
                         decision_thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5),
                         seed: int = 0) -> dict[str, object]:
    """Everything a site reports of one logistic model (``score``: its linear predictor) on its
    test rows: flat numbers (NaN where a metric is undefined, e.g. AUC with one class), and the
    calibration and decision curves as lists of rows, each telling apart groups of 0 or at
    least ``min_count`` patients. ``threshold`` is on the risk scale."""
    y, score = _binary(y, score, "test metrics")
    risk = risk_of(score)
    both = 0 < y.sum() < len(y)
    out: dict[str, object] = {"n": len(y), "n_positive": int(y.sum())}
    auc = auc_delong(y, score) if both else None
    out |= {"auc": auc.auc if auc else NAN, "auc_variance": auc.variance if auc else NAN,
            "auc_low": auc.low if auc else NAN, "auc_high": auc.high if auc else NAN}
    boot = auc_bootstrap_ci(y, score, bootstrap, seed) if both and bootstrap else (NAN, NAN)
    out |= {"auc_boot_low": boot[0], "auc_boot_high": boot[1]}
    cut = at_threshold(y, risk, threshold)
    out |= asdict(cut)
    out["brier"] = brier_score(y, risk)
    cal = _nan_if_fails(calibration, y, risk) if both else None
    out |= {"calibration_intercept": cal.intercept if cal else NAN,
            "calibration_slope": cal.slope if cal else NAN}
    out["calibration_curve"] = [[b.n, b.mean_risk, b.observed]
                                for b in calibration_curve(y, risk, n_bins, min_count)]
    out["decision_curve"] = [[d.threshold, d.model, d.treat_all]
                             for d in decision_curve(y, risk, decision_thresholds, min_count)]
    return out


def regression_table(y: npt.ArrayLike, prediction: npt.ArrayLike) -> dict[str, object]:
    """What a site reports of one regression model on its test rows (NaN where undefined)."""
    y, prediction = np.asarray(y, float), np.asarray(prediction, float)
    error = prediction - y
    out: dict[str, object] = {"n": len(y), "mae": float(np.mean(np.abs(error))),
                              "rmse": float(np.sqrt(np.mean(error**2)))}
    constant = np.std(prediction) == 0 or np.std(y) == 0
    for name, compute in (("r", pearson), ("spearman", spearman)):
        c = None if constant else _nan_if_fails(compute, y, prediction)
        out |= {name: c.r if c else NAN, f"{name}_low": c.low if c else NAN,
                f"{name}_high": c.high if c else NAN, f"{name}_p": c.p_value if c else NAN}
    agreement = _nan_if_fails(bland_altman, y, prediction)
    out |= {"bias": agreement.bias if agreement else NAN,
            "loa_low": agreement.lower if agreement else NAN,
            "loa_high": agreement.upper if agreement else NAN}
    return out


#: What a site's table of one model may hold (:func:`classification_table`,
#: :func:`regression_table`): the site's privacy guard refuses any other key.
CLASSIFICATION_KEYS = frozenset({
    "n", "n_positive", "auc", "auc_variance", "auc_low", "auc_high", "auc_boot_low",
    "auc_boot_high", *(f.name for f in fields(AtThreshold)), "brier", "calibration_intercept",
    "calibration_slope", "calibration_curve", "decision_curve"})
REGRESSION_KEYS = frozenset({
    "n", "mae", "rmse", *(f"{name}{suffix}" for name in ("r", "spearman")
                          for suffix in ("", "_low", "_high", "_p")),
    "bias", "loa_low", "loa_high"})


def as_dict(value: DataclassInstance) -> dict[str, object]:
    """A metric dataclass as a JSON-ready dict."""
    return asdict(value)


__all__ = ["Agreement", "AtThreshold", "Auc", "CLASSIFICATION_KEYS", "Calibration",
           "CalibrationBin", "Correlation", "DecisionPoint", "PairedTest", "Pooled",
           "REGRESSION_KEYS", "as_dict", "at_threshold", "auc_bootstrap_ci", "auc_delong",
           "bland_altman", "brier_score", "calibration", "calibration_curve",
           "coarse_thresholds", "decision_curve", "delong_test", "pearson",
           "pool_random_effects", "spearman", "youden_threshold", "classification_table",
           "regression_table", "risk_of"]
