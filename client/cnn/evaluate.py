"""A site's evaluation of the CNN's global weights (phase 5): metrics of its crops, numbers
only, never a per-patient value."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from client.cnn.crops import cnn_spec, prepare_crops
from client.cnn.device import crop_tensor, select_device, torch_threads
from client.cnn.train import TargetScale, loss_function, scaled_targets
from common.glm import ModelError
from common.network import build_network, load_state_arrays
from common.payloads import MIN_ROWS_SENT, CnnMetrics, SplitMetrics
from common.protocol import StudyProtocol, TaskKind
from common.site_config import SiteConfig


def predict(model: torch.nn.Module, x: np.ndarray, batch_size: int, device: torch.device
            ) -> np.ndarray:
    """The network's outputs on crops (n, z, y, x), float32 (n,), in batches of ``batch_size``
    (float16 autocast on CUDA); the model as it is (call ``eval()`` first)."""
    outputs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            inputs = crop_tensor(x[start: start + batch_size], device)
            with torch.autocast(device_type=device.type, dtype=torch.float16,
                                enabled=device.type == "cuda"):
                outputs.append(model(inputs).float().reshape(-1).cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros(0, np.float32)


def _split_metrics(protocol: StudyProtocol, labels: np.ndarray, output: np.ndarray,
                   target: TargetScale | None) -> SplitMetrics:
    nan = float("nan")
    classification = protocol.task.kind is TaskKind.CLASSIFICATION
    n, n_positive = len(labels), int(labels.sum()) if classification else 0
    if n < MIN_ROWS_SENT:
        return SplitMetrics(n, n_positive, nan, nan, nan, nan)
    if not np.all(np.isfinite(output)):
        raise ModelError("the model's output is not finite on some of this site's crops: its "
                         "weights have diverged")
    y = scaled_targets(labels, protocol, target)
    with torch.no_grad():
        loss = float(loss_function(protocol)(torch.from_numpy(output.astype(np.float32)),
                                              torch.from_numpy(y)))
    if classification:
        auc = float(roc_auc_score(labels, output)) if 0 < n_positive < n else nan
        return SplitMetrics(n, n_positive, loss, auc, nan, nan)
    scale = target or TargetScale.from_protocol(protocol)
    predicted = output.astype(np.float64) * scale.scale + scale.center
    r = float(np.corrcoef(predicted, labels)[0, 1]) if np.std(predicted) > 0 and np.std(
        labels) > 0 else nan
    return SplitMetrics(n, 0, loss, nan, r, float(np.mean(np.abs(predicted - labels))))


def training_loss(site: SiteConfig, protocol: StudyProtocol, arrays: Mapping[str, np.ndarray],
                  rows: np.ndarray, *, device: torch.device | None = None) -> float:
    """The loss of the weights ``arrays`` on those ``rows`` (a boolean mask) of this site's
    training crops, without augmentation, the network in eval mode; NaN on fewer than
    :data:`~common.payloads.MIN_ROWS_SENT` crops."""
    spec = cnn_spec(protocol)
    device = device or select_device(site.device)
    x, labels = prepare_crops(site, protocol).split("train")
    with torch_threads(site.n_workers):
        model = build_network(spec, protocol.task.kind)
        load_state_arrays(model, arrays)
        model.to(device).eval()
        output = predict(model, x[rows], spec.batch_size, device)
    return _split_metrics(protocol, labels[rows], output, None).loss


def evaluate_arrays(site: SiteConfig, protocol: StudyProtocol, arrays: Mapping[str, np.ndarray],
                    *, include_train: bool = True, device: torch.device | None = None,
                    target: TargetScale | None = None) -> CnnMetrics:
    """Metrics of the weights ``arrays`` on this site's test crops (and training crops, without
    augmentation, when ``include_train``), the network in eval mode (BatchNorm uses the
    running statistics the weights carry)."""
    start = time.perf_counter()
    spec = cnn_spec(protocol)
    device = device or select_device(site.device)
    crops = prepare_crops(site, protocol)
    with torch_threads(site.n_workers):
        model = build_network(spec, protocol.task.kind)
        load_state_arrays(model, arrays)
        model.to(device).eval()

        def metrics(split: str) -> SplitMetrics:
            x, labels = crops.split(split)
            output = predict(model, x, spec.batch_size, device)
            return _split_metrics(protocol, labels, output, target)

        test = metrics("test")
        train = metrics("train") if include_train else None
    return CnnMetrics(site.site_name, test, train, time.perf_counter() - start)
