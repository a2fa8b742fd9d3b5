"""Training the segmentation network on a site's cases, and segmenting with it.

Training (:func:`train_epochs`): per case and epoch, ``patches_per_case`` patches of
``patch_size``, their centres drawn in equal shares from each class present (MONAI's
``RandCropByLabelClassesd``: the thin ROI is not drowned in background), augmented
(:func:`augmentation`), MONAI's Dice + cross-entropy loss, Adam; with ``aggregator =
"fedprox"`` and an anchor, FedProx's proximal term. CUDA with float16 autocast and a gradient
scaler when the device is a GPU, else float32 on the CPU. Same seed, same weights (on the CPU).

Inference (:func:`class_probabilities`): MONAI's sliding window over the whole input, patches
of ``patch_size`` overlapping by a quarter, blended with Gaussian weights, softmax.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandCropByLabelClassesd,
    RandFlipd,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from client.cnn.device import optimizer_step
from common.glm import ModelError
from common.protocol import SegmentationSpec


@dataclass(frozen=True)
class TrainingCase:
    """One case for training: the network's input and its classes, (z, y, x) each."""

    values: np.ndarray
    classes: np.ndarray


@dataclass(frozen=True)
class EpochsResult:
    """Local training's summary: the mean loss over every patch seen, the patches and the
    cases they came from, wall seconds."""

    loss: float
    patches: int
    cases: int
    seconds: float


def seed_of(seed: int, *parts: object) -> int:
    """A 32-bit seed from the study seed and what distinguishes this use (site, round, ...)."""
    digest = hashlib.sha256("/".join(str(p) for p in (seed, *parts, "segment")).encode())
    return int.from_bytes(digest.digest()[:4], "little")


def patch_zyx(spec: SegmentationSpec) -> tuple[int, int, int]:
    x, y, z = spec.patch_size
    return z, y, x


def augmentation(spec: SegmentationSpec, n_classes: int, seed: int) -> Compose:
    """Patch sampling and, with ``spec.augment``, flips (left-right, cranio-caudal), an axial
    rotation up to 15 degrees, an intensity scale and shift of 10% and a gamma of 0.7-1.5 (a
    scanner's response), as MONAI dictionary transforms of ``image`` and ``label``, seeded."""
    keys = ["image", "label"]
    steps: list[object] = [
        SpatialPadd(keys, spatial_size=patch_zyx(spec)),
        RandCropByLabelClassesd(keys, label_key="label", spatial_size=patch_zyx(spec),
                                num_classes=n_classes, ratios=[1.0] * n_classes,
                                num_samples=spec.patches_per_case, warn=False)]
    if spec.augment:
        steps += [
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandRotated(keys, range_x=math.radians(15), prob=0.3, mode=("bilinear", "nearest"),
                        padding_mode="zeros"),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
            RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3)]
    transforms = Compose(steps)
    transforms.set_random_state(seed=seed)
    return transforms


def train_epochs(network: torch.nn.Module, cases: Sequence[TrainingCase],
                 spec: SegmentationSpec, n_classes: int, *, epochs: int, seed: int,
                 device: torch.device, proximal_mu: float = 0.0) -> EpochsResult:
    """Train ``network`` (in place, left on the CPU) for ``epochs`` epochs over ``cases``.

    ``proximal_mu`` > 0 adds FedProx's ``mu / 2 * ||w - w_0||^2`` to the start weights.
    A :class:`ModelError` when there is no case, or the loss is not finite (a diverged
    network sends nothing)."""
    if not cases:
        raise ModelError("no case with a mask to train the segmentation network on")
    start = time.perf_counter()
    cuda = device.type == "cuda"
    rng = np.random.default_rng(seed)
    sampler = augmentation(spec, n_classes, seed)
    criterion = DiceCELoss(to_onehot_y=True, softmax=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network.to(device).train()
        anchor = [p.detach().clone() for p in network.parameters()] if proximal_mu > 0 else []
        optimizer = torch.optim.Adam(network.parameters(), lr=spec.learning_rate)
        scaler = torch.amp.GradScaler("cuda", enabled=cuda)
        total, seen = 0.0, 0
        for _ in range(epochs):
            patches: list[dict[str, np.ndarray]] = []
            for index in rng.permutation(len(cases)):
                case = cases[index]
                patches += sampler({"image": case.values[None], "label": case.classes[None]})
            order = rng.permutation(len(patches))
            for batch in np.array_split(order, math.ceil(len(order) / spec.batch_size)):
                image = torch.stack([torch.as_tensor(np.asarray(patches[i]["image"]))
                                     for i in batch]).float().to(device)
                label = torch.stack([torch.as_tensor(np.asarray(patches[i]["label"]))
                                     for i in batch]).to(device)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=cuda):
                    output = network(image)
                loss = criterion(output.float(), label)
                if not torch.isfinite(loss):
                    raise ModelError("the segmentation loss is not finite: the network diverged")
                optimizer_step(network, loss, optimizer, scaler, anchor, proximal_mu)
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
    network.cpu()
    return EpochsResult(total / seen, seen, len(cases), time.perf_counter() - start)


def class_probabilities(network: torch.nn.Module, values: np.ndarray, spec: SegmentationSpec,
                        device: torch.device) -> np.ndarray:
    """Softmax class probabilities (n_classes, z, y, x) of one input, float32."""
    network.to(device).eval()
    cuda = device.type == "cuda"
    inputs = torch.from_numpy(np.ascontiguousarray(values[None, None])).to(device)
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.float16,
                                         enabled=cuda):
        logits = sliding_window_inference(inputs, patch_zyx(spec), sw_batch_size=4,
                                          predictor=network, overlap=0.25, mode="gaussian")
    assert isinstance(logits, torch.Tensor)  # one output head
    network.cpu()
    return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
