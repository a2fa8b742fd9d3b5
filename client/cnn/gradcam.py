"""The site's own view of the final CNN (phase 5): full test outputs and Grad-CAM maps, kept at
the site for its report and never sent."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from monai.visualize import GradCAM

from client.cnn.crops import cnn_spec, prepare_crops
from client.cnn.device import crop_tensor, select_device, torch_threads
from client.cnn.evaluate import predict
from client.cnn.train import TargetScale
from common.network import build_network, load_state_arrays
from common.protocol import StudyProtocol, TaskKind
from common.site_config import SiteConfig

#: The layer whose activations Grad-CAM weighs, by architecture (MONAI's module names).
CAM_LAYERS = {"resnet10": "layer4", "resnet18": "layer4", "densenet121": "class_layers.relu"}


@dataclass(frozen=True)
class CnnSiteView:
    """What the site keeps of the final global CNN: its test labels and outputs (logits, or
    predictions in label units), and Grad-CAM maps with the crops of a few test cases."""

    labels: np.ndarray
    output: np.ndarray
    shown: list[tuple[str, float]]  # (case id, label) of the cases with a Grad-CAM map
    crops: np.ndarray   # (k, z, y, x) of the cases shown
    cams: np.ndarray    # (k, z, y, x), each in [0, 1]


def site_view(site: SiteConfig, protocol: StudyProtocol, arrays: Mapping[str, np.ndarray],
              *, n_cams: int = 4, device: torch.device | None = None,
              target: TargetScale | None = None) -> CnnSiteView:
    """The final weights on this site's test crops, and MONAI's Grad-CAM (Selvaraju et al.
    2017) on up to ``n_cams`` of them (positives first, for classification): what the model
    looked at, for the site's own report."""
    spec = cnn_spec(protocol)
    device = device or select_device(site.device)
    crops = prepare_crops(site, protocol)
    x, labels = crops.split("test")
    ids = [c for c, s in zip(crops.case_ids, crops.splits, strict=True) if s == "test"]
    with torch_threads(site.n_workers):
        model = build_network(spec, protocol.task.kind)
        load_state_arrays(model, arrays)
        model.to(device).eval()
        output = predict(model, x, spec.batch_size, device).astype(np.float64)
        if protocol.task.kind is TaskKind.REGRESSION:
            scale = target or TargetScale.from_protocol(protocol)
            output = output * scale.scale + scale.center
        order = np.argsort(-labels, kind="stable")[:n_cams] if len(x) else np.zeros(0, int)
        cams = np.zeros((0, *x.shape[1:]), np.float32)
        if len(order):
            cam = GradCAM(nn_module=model, target_layers=CAM_LAYERS[spec.architecture])
            cams = cam(crop_tensor(x[order], device), class_idx=0).detach().cpu().numpy()[:, 0]
    return CnnSiteView(labels, output, [(ids[i], float(labels[i])) for i in order], x[order],
                       cams.astype(np.float32))
