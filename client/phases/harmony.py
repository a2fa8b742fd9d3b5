"""Federated Harmony on the CNN's embeddings (``harmonization.embeddings``), a site's side.

The final CNN evaluation kept this site's embeddings (:mod:`client.cnn.embed`). The first
round asks for their sums (count, sum and sum of outer products, as CovBat's first round) so
that the server can find their principal axes; the next rounds are Harmony's
(:func:`harmonization.federated_harmony.answer`) on the embeddings projected onto them. Each
message starts a fresh process, so the site's Harmony state (its embeddings' memberships and
corrections, never sent) is kept between rounds in ``<study dir>/cnn/``
(:data:`client.workspace.HARMONY_STATE_FILE`), and the corrected embeddings beside it
(:data:`client.workspace.HARMONIZED_EMBEDDINGS_FILE`).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from client.workspace import (
    HARMONIZED_EMBEDDINGS_FILE,
    HARMONY_STATE_FILE,
    load_embeddings,
    study_dir,
)
from common.errors import ConfigError
from common.payloads import MIN_ROWS_SENT
from common.protocol import StudyProtocol
from common.provenance import atomic_write_npz
from common.site_config import SiteConfig
from harmonization.covbat import PrincipalAxes, ResidualProducts, site_residual_products
from harmonization.federated_harmony import (
    FederatedHarmonyOptions,
    HarmonySite,
    Reply,
    answer,
)
from harmonization.messages import EmbeddingHarmonyRequest


def harmony_options(protocol: StudyProtocol, seed: int, floor: int = MIN_ROWS_SENT
                    ) -> FederatedHarmonyOptions:
    """The protocol's Harmony, with ``floor`` as the fewest embeddings a sum may average."""
    spec = protocol.harmonization.embeddings
    if spec is None:
        raise ConfigError("study protocol", ["has no harmonization.embeddings section"])
    return FederatedHarmonyOptions.of(spec, seed, max(floor, MIN_ROWS_SENT))


def embedding_products(site: SiteConfig, protocol: StudyProtocol) -> ResidualProducts:
    """The first round: the count, sum and sum of outer products of this site's embeddings."""
    embeddings = load_embeddings(site, protocol)
    floor = max(site.min_patients, MIN_ROWS_SENT)
    if len(embeddings.case_ids) < floor:
        raise ConfigError(site.site_name, [
            f"{len(embeddings.case_ids)} CNN embeddings, fewer than the {floor} a sum may "
            "average: this site takes no part in Harmony"])
    return site_residual_products(embeddings.values)


def harmony_round(site: SiteConfig, protocol: StudyProtocol, seed: int,
                  request: EmbeddingHarmonyRequest) -> Reply:
    """One of Harmony's rounds: the state read (or, for ``counts``, made from the embeddings
    projected onto the request's axes), the reply computed, the state kept."""
    if request.request is None:
        raise ConfigError("Harmony request", ["names no step"])
    options = harmony_options(protocol, seed, site.min_patients)
    folder = study_dir(site, protocol) / "cnn"
    if request.request.step == "counts":
        harmony = _start(site, protocol, request.axes, options, seed)
    else:
        harmony = _read_state(folder / HARMONY_STATE_FILE, options)
    reply = answer(harmony, request.request)
    atomic_write_npz(folder / HARMONY_STATE_FILE, harmony.state())
    if request.request.step == "mixing":
        embeddings = load_embeddings(site, protocol)
        atomic_write_npz(folder / HARMONIZED_EMBEDDINGS_FILE, {
            "case_ids": np.array(embeddings.case_ids, dtype=str),
            "splits": np.array(embeddings.splits, dtype=str),
            "scanners": np.array(embeddings.scanners, dtype=str),
            "values": harmony.corrected})
    return reply


def _start(site: SiteConfig, protocol: StudyProtocol, axes: PrincipalAxes | None,
           options: FederatedHarmonyOptions, seed: int) -> HarmonySite:
    if axes is None:
        raise ConfigError("Harmony request", ["the 'counts' step carries no principal axes"])
    embeddings = load_embeddings(site, protocol)
    if axes.mean.shape != (embeddings.values.shape[1],):
        raise ConfigError("Harmony request", [
            f"principal axes of {axes.mean.shape[0]} features for embeddings of "
            f"{embeddings.values.shape[1]}"])
    from client.folds import split_state  # brings scikit-learn: only this round needs it

    scores = (embeddings.values - axes.mean) @ axes.components
    return HarmonySite(scores, embeddings.scanners, options, seed=split_state(seed, site.site_name))


def _read_state(path: Path, options: FederatedHarmonyOptions) -> HarmonySite:
    try:
        with np.load(path, allow_pickle=False) as kept:
            return HarmonySite.from_state({k: kept[k] for k in kept.files}, options)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(str(path), [f"this site's Harmony state is missing or unreadable "
                                      f"({exc}): the run must start again"]) from None
