"""The CNN's embeddings of a site's cases (``harmonization.embeddings``): each crop's
activations entering the network's last linear layer (its penultimate features), under the final
global model. Kept at the site, beside the crops (:func:`client.workspace.load_embeddings` reads
them without torch); federated Harmony (:mod:`client.phases.harmony`) sends only sums."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from client.cnn.crops import cnn_spec, prepare_crops
from client.cnn.device import select_device, torch_threads
from client.cnn.evaluate import predict
from client.workspace import PREPARED_FILE, Embeddings, embeddings_path, load_study_table
from common.errors import ConfigError
from common.network import build_network, load_state_arrays
from common.protocol import StudyProtocol
from common.provenance import atomic_write_npz
from common.site_config import SiteConfig


def penultimate(model: torch.nn.Module, x: np.ndarray, batch_size: int, device: torch.device
                ) -> np.ndarray:
    """What enters ``model``'s last ``Linear`` layer for each crop, (n, features) float64."""
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linear:
        raise ConfigError("study protocol", ["harmonization.embeddings: the CNN has no linear "
                                             "layer to take the embeddings before"])
    captured: list[np.ndarray] = []

    def keep(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0].detach().float().reshape(len(inputs[0]), -1).cpu().numpy())

    handle = linear[-1].register_forward_pre_hook(keep)
    try:
        predict(model, x, batch_size, device)
    finally:
        handle.remove()
    if not captured:
        return np.zeros((0, linear[-1].in_features))
    return np.concatenate(captured).astype(np.float64)


def save_embeddings(site: SiteConfig, protocol: StudyProtocol,
                    arrays: Mapping[str, np.ndarray]) -> Embeddings:
    """Embed every crop of this site with the weights ``arrays`` (eval mode) and keep them
    here (written atomically)."""
    spec = cnn_spec(protocol)
    crops = prepare_crops(site, protocol)
    table = load_study_table(site, protocol, PREPARED_FILE)
    scanner = dict(zip(table["case_id"].astype(str), table["batch"].astype(str), strict=True))
    device = select_device(site.device)
    with torch_threads(site.n_workers):
        model = build_network(spec, protocol.task.kind)
        load_state_arrays(model, arrays)
        model.to(device).eval()
        values = penultimate(model, crops.crops, spec.batch_size, device)
    result = Embeddings(crops.case_ids, crops.splits,
                        tuple(scanner[c] for c in crops.case_ids), values)
    atomic_write_npz(embeddings_path(site, protocol), {
        "case_ids": np.array(result.case_ids, dtype=str),
        "splits": np.array(result.splits, dtype=str),
        "scanners": np.array(result.scanners, dtype=str), "values": values})
    return result
