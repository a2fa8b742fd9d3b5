"""The CNN's embeddings of a site's cases (``harmonization.embeddings``): each crop's
activations entering the network's last linear layer (its penultimate features), under the final
global model. Kept at the site, beside the crops; federated Harmony
(:mod:`client.phases.harmony`) reads them and sends only sums."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.cnn.crops import cnn_spec, prepare_crops
from client.cnn.device import select_device, torch_threads
from client.cnn.evaluate import predict
from client.workspace import EMBEDDINGS_FILE, PREPARED_FILE, load_study_table, study_dir
from common.errors import ConfigError
from common.network import build_network, load_state_arrays
from common.protocol import StudyProtocol
from common.provenance import atomic_write_npz
from common.site_config import SiteConfig


@dataclass(frozen=True)
class Embeddings:
    """A site's embeddings (cases, features), float64, with each case's id, split and
    scanner (its ComBat batch)."""
    case_ids: tuple[str, ...]
    splits: tuple[str, ...]
    scanners: tuple[str, ...]
    values: np.ndarray


def embeddings_path(site: SiteConfig, protocol: StudyProtocol) -> Path:
    return study_dir(site, protocol) / "cnn" / EMBEDDINGS_FILE


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


def load_embeddings(site: SiteConfig, protocol: StudyProtocol) -> Embeddings:
    """This site's embeddings; a :class:`ConfigError` naming the file when it has none."""
    path = embeddings_path(site, protocol)
    try:
        with np.load(path, allow_pickle=False) as npz:
            values = np.asarray(npz["values"], dtype=np.float64)
            return Embeddings(tuple(npz["case_ids"].tolist()), tuple(npz["splits"].tolist()),
                              tuple(npz["scanners"].tolist()), values)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(str(path), [f"no CNN embeddings of this site ({exc}): its final "
                                      "CNN evaluation did not run or failed"]) from None
