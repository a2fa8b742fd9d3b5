"""One round of the CNN's local training at a site (phase 5): FedAvg's and FedProx's local step.

The regression target
    Labels are mapped from ``task.value_range = (low, high)`` to [-1, 1] (a :class:`TargetScale`
    derived from the protocol alone, the same at every site, no patient value sent); MSE on that
    scale. A protocol without a value range needs a :class:`TargetScale` passed in (e.g. pooled
    moments from the server).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import Compose, RandFlip, RandRotate, RandZoom

from client.cnn.crops import cnn_spec, prepare_crops
from client.cnn.device import crop_tensor, optimizer_step, select_device, torch_threads
from common.errors import ConfigError
from common.glm import ModelError
from common.network import build_network, load_state_arrays, state_arrays
from common.payloads import MIN_ROWS_SENT
from common.protocol import StudyProtocol, TaskKind
from common.site_config import SiteConfig


@dataclass(frozen=True)
class TargetScale:
    """How regression labels map to the network's output: ``(label - center) / scale``."""

    center: float
    scale: float

    @classmethod
    def from_protocol(cls, protocol: StudyProtocol) -> TargetScale:
        """``task.value_range`` mapped to [-1, 1]: the same at every site, no data needed."""
        value_range = protocol.task.value_range
        if value_range is None:
            raise ConfigError("study protocol", [
                "task.value_range: the CNN scales regression labels by it; set it, or pass a "
                "TargetScale (e.g. the pooled mean and SD of the training labels)"])
        low, high = value_range
        return cls((low + high) / 2.0, (high - low) / 2.0)


@dataclass(frozen=True)
class TrainResult:
    """One site's local training in one round: what the server averages, and a summary.

    ``weights`` as :func:`common.network.state_arrays`; ``n_examples`` training crops (FedAvg's
    weight); ``loss`` the task loss (without the proximal term) averaged over every crop seen in
    the round's local epochs; ``seconds`` of wall time.
    """

    weights: dict[str, np.ndarray]
    n_examples: int
    loss: float
    seconds: float


def round_seed(seed: int, site_name: str, round_index: int) -> int:
    """The seed of one site's round: shuffling and augmentation differ between sites and
    rounds, and repeat exactly for the same study seed."""
    digest = hashlib.sha256(f"{seed}/{site_name}/{round_index}/cnn".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def augmentation(seed: int) -> Compose:
    """MONAI array transforms of one (1, z, y, x) crop: left-right and cranio-caudal flips,
    an in-plane rotation up to 15 degrees and a zoom of 0.9-1.1 (padding with 0, the ROI mean
    of a crop), seeded."""
    transforms = Compose([
        RandFlip(prob=0.5, spatial_axis=2),  # x: left-right
        RandFlip(prob=0.5, spatial_axis=0),  # z: cranio-caudal
        # range_x rotates in the plane of the last two axes, (y, x): axial, as slices are thick
        RandRotate(range_x=math.radians(15), prob=0.5, padding_mode="zeros",
                   mode="bilinear"),
        RandZoom(prob=0.5, min_zoom=0.9, max_zoom=1.1, mode="trilinear",
                 padding_mode="constant", keep_size=True),
    ])
    transforms.set_random_state(seed=seed)
    return transforms


def scaled_targets(labels: np.ndarray, protocol: StudyProtocol, target: TargetScale | None
                   ) -> np.ndarray:
    """What the network's output is compared with, float32 (n,): 0/1 labels as they are, or
    regression labels on the :class:`TargetScale` (default: the protocol's)."""
    if protocol.task.kind is TaskKind.CLASSIFICATION:
        return labels.astype(np.float32)
    scale = target or TargetScale.from_protocol(protocol)
    return ((labels - scale.center) / scale.scale).astype(np.float32)


def loss_function(protocol: StudyProtocol) -> torch.nn.Module:
    """The task loss on the network's output: BCE with logits, or MSE on the scaled target."""
    if protocol.task.kind is TaskKind.CLASSIFICATION:
        return torch.nn.BCEWithLogitsLoss()
    return torch.nn.MSELoss()


def _adam(model: torch.nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """Adam, fused where this torch has it for the model's device (on the CPU: one pass over the
    14M weights of a ResNet-10 instead of ten, 10x faster a step); else the plain loop."""
    try:
        return torch.optim.Adam(model.parameters(), lr=learning_rate, fused=True)
    except (RuntimeError, TypeError):  # torch < 2.4 on the CPU
        return torch.optim.Adam(model.parameters(), lr=learning_rate)


def train_round(site: SiteConfig, protocol: StudyProtocol, global_arrays: Mapping[str, np.ndarray],
                *, round_index: int, seed: int, device: torch.device | None = None,
                target: TargetScale | None = None, epochs: int | None = None,
                rows: np.ndarray | None = None) -> TrainResult:
    """Train the global model on this site's training crops (or those ``rows`` of them, a
    boolean mask) for ``cnn.local_epochs`` epochs (or ``epochs``: the final fine-tuning's).

    Adam (``cnn.learning_rate``, fresh each round); BCE-with-logits (classification) or MSE on
    the scaled target (regression, :class:`TargetScale`); with ``cnn.aggregator == "fedprox"``
    the proximal term ``mu / 2 * ||w - w_global||^2`` over the parameters. Batches are split
    evenly (no batch of one when ``batch_size`` > 1). On CUDA: float16 autocast and a gradient
    scaler; on CPU: float32 and ``site.n_workers`` torch threads. Same seed, round and site on
    CPU: the same weights.

    Parameters
    ----------
    global_arrays
        The round's global weights, as :func:`common.network.state_arrays`.
    round_index, seed
        The round and the study seed: with the site name they seed shuffling and augmentation.
    device
        Default: :func:`~client.cnn.device.select_device` of ``site.device``.
    target
        Regression only: default :meth:`TargetScale.from_protocol`.

    Raises
    ------
    ModelError
        Fewer than :data:`common.payloads.MIN_ROWS_SENT` training crops (weights fitted to so few
        patients would come close to describing them), or unusable global weights.
    """
    start = time.perf_counter()
    spec = cnn_spec(protocol)
    device = device or select_device(site.device)
    x, labels = prepare_crops(site, protocol).split("train")
    if rows is not None:
        x, labels = x[rows], labels[rows]
    if len(labels) < MIN_ROWS_SENT:
        raise ModelError(f"site '{site.site_name}' has fewer than {MIN_ROWS_SENT} training "
                         "crops: it sends no weights trained on them")
    y = scaled_targets(labels, protocol, target)
    this_seed = round_seed(seed, site.site_name, round_index)
    cuda = device.type == "cuda"
    with torch_threads(site.n_workers), torch.random.fork_rng(devices=[]):
        torch.manual_seed(this_seed)
        model = build_network(spec, protocol.task.kind, seed=seed)
        load_state_arrays(model, global_arrays)
        model.to(device).train()
        anchor = [p.detach().clone() for p in model.parameters()]
        mu = spec.proximal_mu if spec.aggregator == "fedprox" else 0.0
        criterion = loss_function(protocol)
        optimizer = _adam(model, spec.learning_rate)
        scaler = torch.amp.GradScaler("cuda", enabled=cuda)
        augment = augmentation(this_seed) if spec.augment else None
        rng = np.random.default_rng(this_seed)
        n = len(y)
        total, seen = 0.0, 0
        for _ in range(spec.local_epochs if epochs is None else epochs):
            order = rng.permutation(n)
            for batch in np.array_split(order, math.ceil(n / spec.batch_size)):
                xb = x[batch]
                if augment is not None:
                    xb = np.stack([np.asarray(augment(crop[None]))[0] for crop in xb])
                inputs = crop_tensor(xb, device)
                yb = torch.from_numpy(y[batch]).to(device)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=cuda):
                    output = model(inputs)
                loss = criterion(output.float().reshape(-1), yb)
                optimizer_step(model, loss, optimizer, scaler, anchor, mu)
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
        model.cpu()
        weights = state_arrays(model)
    return TrainResult(weights, n, total / seen, time.perf_counter() - start)
