"""Image harmonization, before the preparation: the sites' histogram landmark sums per scanner
become the study's standard landmarks (:mod:`harmonization.images`), which every site then
standardizes its images onto; with acquisition matching, their noise and spacing sums become
the study's target noise level and resolution. Written to ``images.json``; the preparation's
request carries it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from common.errors import HarmonizationError
from common.messages import MessageType, StudyRequest
from common.provenance import atomic_write_json
from common.records import pack_request
from harmonization.images import (
    AXES,
    PERCENTILES,
    ImageStandard,
    ImageSums,
    combine_image_sums,
)
from server.rounds import Transport, collect, exchange, study_config
from server.study import StudySettings, StudyStopped

IMAGES_FILE = "images.json"


@dataclass(frozen=True)
class ImagesSummary:
    """The standard, and the sites whose landmarks are missing (by name, with the reason):
    they did not shape it, and their preparation standardizes onto it all the same."""
    standard: ImageStandard
    missing: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"standard": json.loads(self.standard.to_json()), "missing": self.missing}


def run_images(transport: Transport, nodes: dict[int, str], settings: StudySettings
               ) -> ImagesSummary:
    """One round: each site's landmark sums per scanner; the server averages them."""
    histogram = settings.protocol.standardization.histogram
    if histogram is None:
        raise HarmonizationError("the protocol asks for no histogram standardization")
    started = time.monotonic()
    config = study_config(settings, seed=settings.seed, test_fraction=settings.test_fraction)
    replies, failed = exchange(transport, nodes, MessageType.IMAGE_LANDMARKS,
                               lambda _: pack_request(StudyRequest(config)), settings)
    sums = collect(replies, failed, "sums", ImageSums,
                   {"counts": (-1,), "landmarks": (-1, len(PERCENTILES)), "noise": (-1,),
                    "spacing": (-1, len(AXES))})
    for site, part in list(sums.items()):
        if not len(part.scanners) == len(part.counts) == len(part.landmarks) == \
                len(part.noise) == len(part.spacing):
            failed[site] = f"its sums name {len(part.scanners)} scanners for " \
                           f"{len(part.counts)} counts"
            del sums[site]
    try:
        matching = settings.protocol.standardization.matching
        standard = combine_image_sums(sums, histogram.scale,
                                      matching is not None and matching.noise,
                                      matching is not None and matching.resolution)
    except HarmonizationError as exc:
        raise StudyStopped(f"image harmonization: {exc}") from None
    summary = ImagesSummary(standard, dict(sorted(failed.items())))
    atomic_write_json(settings.out_dir / IMAGES_FILE,
                      {**summary.to_json(), "round_seconds": time.monotonic() - started})
    return summary

