"""Phase 5, the CNN: one train message a round (the received global weights scored on the test
crops, then trained on the training crops), and the final evaluation of the global model."""

from __future__ import annotations

import dataclasses
import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve
from sklearn.model_selection import train_test_split

from client.cnn.crops import prepare_crops
from client.cnn.evaluate import evaluate_arrays, training_loss
from client.cnn.gradcam import site_view
from client.cnn.train import TrainResult, train_round
from client.folds import split_state
from client.report import refresh_site_report, report_dir
from client.scoring import metrics_of
from client.workspace import study_dir
from common import plots
from common.glm import ModelError
from common.messages import StudyConfig
from common.network import build_network, norm_names, state_arrays
from common.payloads import CNN_LEAVE_SITE_OUT, MIN_ROWS_SENT, SplitMetrics
from common.protocol import StudyProtocol, TaskKind
from common.provenance import atomic_write_json, atomic_write_npz
from common.site_config import SiteConfig

#: FedBN (``cnn.local_norm``): this site's normalization layers after its last round, under its
#: study folder's ``cnn/``.
LOCAL_NORM_FILE = "local_norm.npz"
#: ``cnn.fine_tune_epochs``: the final global model fine-tuned on this site's crops, every array,
#: under its study folder's ``cnn/``.
FINE_TUNED_FILE = "fine_tuned.npz"
#: The share of a site's training crops the fine-tuned CNN is weighed on against the global one.
FINE_TUNE_HELD_OUT = 0.25

log = logging.getLogger("myelofed.site")


def local_norm_path(site: SiteConfig, protocol: StudyProtocol) -> Path:
    return study_dir(site, protocol) / "cnn" / LOCAL_NORM_FILE


def with_local_norm(site: SiteConfig, protocol: StudyProtocol, weights: Mapping[str, np.ndarray],
                    seed: int, first_round: bool = False) -> dict[str, np.ndarray]:
    """The global weights received, completed with this site's own normalization layers when
    the protocol keeps them local (FedBN): those of its last round, or the initial network's
    (study ``seed``) in the first round or when none were kept (a damaged file is named in the
    log)."""
    spec = protocol.cnn
    if spec is None or not spec.local_norm:
        return dict(weights)
    network = build_network(spec, protocol.task.kind, seed=seed)
    names = norm_names(network)
    own = {k: v for k, v in state_arrays(network).items() if k in names}
    path = local_norm_path(site, protocol)
    if not first_round and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as kept:
                if set(kept.files) == names:
                    own = {k: kept[k] for k in names}
                else:
                    log.warning("%s holds other layers than the network's: the initial "
                                "normalization layers are used", path)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("%s is unreadable (%s): the initial normalization layers are used",
                        path, exc)
    return {**weights, **own}


def keep_local_norm(site: SiteConfig, protocol: StudyProtocol, weights: Mapping[str, np.ndarray],
                    sent: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """With FedBN, keep the trained normalization layers here (written atomically) and return
    the arrays that travel: those the server sent, by name. Without it, every array."""
    spec = protocol.cnn
    if spec is None or not spec.local_norm:
        return dict(weights)
    atomic_write_npz(local_norm_path(site, protocol),
                     {k: v for k, v in weights.items() if k not in sent})
    return {k: weights[k] for k in sent}


def train(site: SiteConfig, protocol: StudyProtocol, study: StudyConfig,
          weights: Mapping[str, np.ndarray]) -> tuple[dict[str, float], TrainResult]:
    """Evaluate the global weights received on the test crops (one message a round: the
    metrics of round r - 1's model come back with round r's training), then train them. With
    FedBN (``cnn.local_norm``) the site's own normalization layers complete the model, are
    trained with it and stay here; the result's weights are those that travel."""
    round_index, seed = study.required("server_round"), study.required("seed")
    full = with_local_norm(site, protocol, weights, seed, first_round=round_index == 1)
    before = evaluate_arrays(site, protocol, full, include_train=False)
    result = train_round(site, protocol, full, round_index=round_index, seed=seed)
    result = dataclasses.replace(result, weights=keep_local_norm(site, protocol, result.weights,
                                                                 weights))
    metrics = {"num-examples": result.n_examples, "train_loss": result.loss,
               "train_seconds": result.seconds,
               **{f"global_{k}": v for k, v in before.as_record().items()}}
    return metrics, result


def evaluate(site: SiteConfig, protocol: StudyProtocol, study: StudyConfig,
             weights: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The final global model's metrics at this site (and its section of the site's report:
    the AUC's CI, ROC and Grad-CAM maps, kept here); with FedBN, with its own normalization
    layers. A request naming the model trained without this site
    (:data:`~common.payloads.CNN_LEAVE_SITE_OUT`) gets that model's test metrics alone."""
    if study.models == (CNN_LEAVE_SITE_OUT,):
        scored = evaluate_arrays(site, protocol, weights, include_train=False)
        return {"num-examples": scored.test.n, **scored.as_record()}
    seed = study.seed if study.seed is not None else 0
    weights = with_local_norm(site, protocol, weights, seed)
    result = evaluate_arrays(site, protocol, weights)
    if protocol.harmonization.embeddings is not None:
        keep_embeddings(site, protocol, weights)
    local = local_baseline(site, protocol, seed)
    tuned = fine_tuned(site, protocol, weights, seed, result.test)
    interval = record_cnn(site, protocol, dict(weights),
                          study.threshold if study.threshold is not None else 0.5, seed)
    return {"num-examples": result.test.n, **result.as_record(), **interval, **local, **tuned}


def keep_embeddings(site: SiteConfig, protocol: StudyProtocol,
                    weights: Mapping[str, np.ndarray]) -> None:
    """For Harmony on the embeddings (``harmonization.embeddings``), this site's embeddings
    under the final model, kept here; a failure is logged (Harmony then names this site) and
    the evaluation's metrics still leave."""
    from client.cnn.embed import save_embeddings  # only studies that harmonize embeddings

    try:
        save_embeddings(site, protocol, weights)
    except Exception as exc:  # noqa: BLE001 - the metrics must not be lost for it
        log.warning("%s: CNN embeddings not kept: %r", site.site_name, exc)


def fine_tuned(site: SiteConfig, protocol: StudyProtocol, weights: Mapping[str, np.ndarray],
               seed: int, scored: SplitMetrics) -> dict[str, float]:
    """With ``cnn.fine_tune_epochs`` k > 0, the final global model (complete: with FedBN, this
    site's normalization layers) trained k more epochs on this site's training crops, kept here
    (:data:`FINE_TUNED_FILE`, written atomically) and scored on its test crops, as
    ``finetuned_test_*`` metrics; seeded as the round after the last.

    Which of the two the site should use is chosen without its test crops: the global model is
    fine-tuned the same way on three quarters of the training crops (:func:`held_out_rows`),
    and the one with the lower loss on the last quarter wins (a tie, or a quarter too small to
    score, keeps the global model). The winner's test metrics are the ``updated_test_*``
    (``scored``: the global model's), with ``finetune_chosen`` (1 or 0) and both held-out
    losses. Empty when the protocol does not ask, or when this site cannot train (named in
    the log)."""
    spec = protocol.cnn
    if spec is None or not spec.fine_tune_epochs:
        return {}
    _, labels = prepare_crops(site, protocol).split("train")
    held = held_out_rows(labels, protocol, seed, site.site_name)
    after = {"round_index": spec.rounds + 1, "seed": seed, "epochs": spec.fine_tune_epochs}
    try:
        tuned = train_round(site, protocol, weights, **after).weights
        test = evaluate_arrays(site, protocol, tuned, include_train=False).test
        part = train_round(site, protocol, weights, rows=~held, **after).weights
        losses = [training_loss(site, protocol, w, held) for w in (weights, part)]
    except ModelError as exc:  # too few crops, or a network that diverged
        log.warning("%s: no fine-tuned CNN: %s", site.site_name, exc)
        return {}
    atomic_write_npz(study_dir(site, protocol) / "cnn" / FINE_TUNED_FILE, tuned)
    chosen = bool(losses[1] < losses[0])  # False where either is NaN
    log.info("%s: held-out loss of the global CNN %.4f, fine-tuned %.4f: the %s model",
             site.site_name, *losses, "fine-tuned" if chosen else "global")
    return {**{f"finetuned_test_{k}": v for k, v in dataclasses.asdict(test).items()},
            **{f"updated_test_{k}": v for k, v in dataclasses.asdict(
                test if chosen else scored).items()},
            "finetune_chosen": float(chosen), "held_out_loss_global": losses[0],
            "held_out_loss_finetuned": losses[1]}


def held_out_rows(labels: np.ndarray, protocol: StudyProtocol, seed: int, site_name: str
                  ) -> np.ndarray:
    """A quarter of a site's training crops (a boolean mask, stratified by label where every
    class has two crops or more), seeded by the study seed and the site: where the fine-tuned
    CNN is weighed against the global one."""
    index = np.arange(len(labels))
    classification = protocol.task.kind is TaskKind.CLASSIFICATION
    stratify = (labels if classification and len(labels) > 1
                and np.min(np.unique(labels, return_counts=True)[1]) > 1 else None)
    _, held = train_test_split(index, test_size=FINE_TUNE_HELD_OUT,
                               random_state=split_state(seed, site_name), stratify=stratify)
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def local_baseline(site: SiteConfig, protocol: StudyProtocol, seed: int) -> dict[str, float]:
    """With ``cnn.local_baseline``, the CNN trained on this site's crops alone (the study's
    rounds of local epochs, from the initial network of study ``seed``) scored on its test
    crops, as ``local_test_*`` metrics; the network stays here. Empty when the protocol does
    not ask, or when this site cannot train one alone (named in the log)."""
    spec = protocol.cnn
    if spec is None or not spec.local_baseline:
        return {}
    weights = state_arrays(build_network(spec, protocol.task.kind, seed=seed))
    try:
        for round_index in range(1, spec.rounds + 1):
            weights = train_round(site, protocol, weights, round_index=round_index,
                                  seed=seed).weights
        test = evaluate_arrays(site, protocol, weights, include_train=False).test
    except ModelError as exc:  # too few crops, or a network that diverged
        log.warning("%s: no local-only CNN: %s", site.site_name, exc)
        return {}
    return {f"local_test_{k}": v for k, v in dataclasses.asdict(test).items()}


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
