"""Where a site keeps what the study's segmentation network made, and the study's view of its
manifest: a row without a mask becomes a case once the network made it a mask that passed
quality control (light: no torch, so that the handshake and the preparation import it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from client.manifest import CaseSpec, RowProblem, read_manifest
from client.workspace import study_dir
from common.errors import ConfigError
from common.protocol import StudyProtocol
from common.provenance import atomic_write_json
from common.site_config import SiteConfig

#: Under the site's study folder: the study's model file, the masks made and their record.
SEGMENTATION_DIR = "segmentation"
MODEL_FILE = "segmenter.npz"
AUTO_MASKS_FILE = "auto_masks.json"


def segmentation_dir(site: SiteConfig, protocol: StudyProtocol) -> Path:
    return study_dir(site, protocol) / SEGMENTATION_DIR


def auto_masks(site: SiteConfig, protocol: StudyProtocol
               ) -> dict[str, Path | str] | Literal["pending"] | None:
    """The masks the study's network made here: case id -> the mask file, or why it made
    none (:func:`client.manifest.read_manifest`'s ``auto_masks``). None when the protocol has
    no segmentation network; ``"pending"`` before its masks are made. A record that cannot be
    read is a :class:`ConfigError` naming it."""
    if protocol.segmentation is None:
        return None
    path = segmentation_dir(site, protocol) / AUTO_MASKS_FILE
    if not path.is_file():
        return "pending"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return {str(case_id): Path(entry["mask"]) if entry.get("mask") else
                str(entry.get("reason") or "no mask")
                for case_id, entry in record["cases"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(str(path), [f"unreadable record of the masks made: {exc!r}"]) from None


def write_auto_masks(site: SiteConfig, protocol: StudyProtocol,
                     cases: dict[str, dict[str, object]]) -> None:
    """Record the masks made (case id -> ``{"mask": path}`` or ``{"reason": text}``)."""
    atomic_write_json(segmentation_dir(site, protocol) / AUTO_MASKS_FILE, {"cases": cases})


def study_manifest(site: SiteConfig, protocol: StudyProtocol
                   ) -> tuple[list[CaseSpec], list[RowProblem]]:
    """The site's manifest as the study reads it (:func:`read_manifest` with the masks the
    network made, see :func:`auto_masks`)."""
    return read_manifest(site.manifest, protocol, default_batch=site.site_name,
                         data_root=site.data_root, auto_masks=auto_masks(site, protocol))
