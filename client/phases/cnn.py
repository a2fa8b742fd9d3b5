"""Phase 5, the CNN: one train message a round (the received global weights scored on the test
crops, then trained on the training crops), and the final evaluation of the global model."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from sklearn.metrics import roc_curve

from client.cnn.evaluate import evaluate_arrays
from client.cnn.gradcam import site_view
from client.cnn.train import TrainResult, train_round
from client.report import refresh_site_report, report_dir
from client.scoring import metrics_of
from common import plots
from common.messages import StudyConfig
from common.payloads import MIN_ROWS_SENT
from common.protocol import StudyProtocol, TaskKind
from common.provenance import atomic_write_json
from common.site_config import SiteConfig


def train(site: SiteConfig, protocol: StudyProtocol, study: StudyConfig,
          weights: Mapping[str, np.ndarray]) -> tuple[dict[str, float], TrainResult]:
    """Evaluate the global weights received on the test crops (one message a round: the
    metrics of round r - 1's model come back with round r's training), then train them."""
    before = evaluate_arrays(site, protocol, weights, include_train=False)
    result = train_round(site, protocol, weights, round_index=study.required("server_round"),
                         seed=study.required("seed"))
    metrics = {"num-examples": result.n_examples, "train_loss": result.loss,
               "train_seconds": result.seconds,
               **{f"global_{k}": v for k, v in before.as_record().items()}}
    return metrics, result


def evaluate(site: SiteConfig, protocol: StudyProtocol, study: StudyConfig,
             weights: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The final global model's metrics at this site (and its section of the site's report:
    the AUC's CI, ROC and Grad-CAM maps, kept here)."""
    result = evaluate_arrays(site, protocol, weights)
    interval = record_cnn(site, protocol, dict(weights),
                          study.threshold if study.threshold is not None else 0.5,
                          study.seed if study.seed is not None else 0)
    return {"num-examples": result.test.n, **result.as_record(), **interval}


def record_cnn(site: SiteConfig, protocol: StudyProtocol, arrays: dict[str, np.ndarray],
               threshold: float, seed: int = 0) -> dict[str, float]:
    """The final global CNN at this site: the full metric table of its test crops, its ROC
    curve and Grad-CAM overlays of a few test cases, recorded here for the site report. Returns
    the AUC's DeLong CI (classification) for the metrics reply."""
    try:
        return _record_cnn(site, protocol, arrays, threshold, seed)
    except Exception as exc:  # noqa: BLE001 - the site's own report must not stop the study
        logging.getLogger(__name__).warning("CNN section of the site report of %s not "
                                            "written: %r", site.site_name, exc)
        return {}


def _record_cnn(site: SiteConfig, protocol: StudyProtocol, arrays: dict[str, np.ndarray],
                threshold: float, seed: int) -> dict[str, float]:
    view = site_view(site, protocol, arrays)
    if len(view.labels) < MIN_ROWS_SENT:
        return {}
    table = metrics_of(protocol, view.labels, view.output, threshold, seed)
    roc = {}
    classification = protocol.task.kind is TaskKind.CLASSIFICATION
    if classification and 0 < view.labels.sum() < len(view.labels):
        fpr, tpr, _ = roc_curve(view.labels, view.output)
        roc["CNN"] = [fpr.tolist(), tpr.tolist()]
    overlays = [{"title": f"Grad-CAM, test case {case} (label {label:g})",
                 "src": plots.cam_figure(crop, cam, f"{case}: label {label:g}")}
                for (case, label), crop, cam in zip(view.shown, view.crops, view.cams,
                                                    strict=True)]
    atomic_write_json(report_dir(site, protocol) / "evaluation_cnn.json",
                      {"metrics": {"models": {"CNN": table}, "comparisons": {}}, "roc": roc,
                       "scatter": {} if classification else {
                           "CNN": [view.labels.tolist(), view.output.tolist()]},
                       "models": {}, "overlays": overlays})
    refresh_site_report(site, protocol)
    return ({"test_auc_low": float(table["auc_low"]), "test_auc_high": float(table["auc_high"])}
            if classification else {"test_r_low": float(table["r_low"]),
                                    "test_r_high": float(table["r_high"])})
