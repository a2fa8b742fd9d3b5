"""The coordinator's image harmonization round: the sites' landmark sums become the study's
standard; a site that fails or sends sums that do not add up is named, not averaged in."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from common.messages import MessageType
from common.protocol import HistogramSpec, load_protocol
from common.records import pack
from harmonization.images import PERCENTILES, scanner_sums
from server.phases.images import IMAGES_FILE, run_images
from server.rounds import Records, Reply
from server.study import StudySettings, StudyStopped
from tests.conftest import image_measure


class Sites:
    """Three nodes that answer the landmark round with fixed sums (or an error)."""

    def __init__(self, answers: Mapping[int, object]) -> None:
        self.answers = answers
        self.asked: list[MessageType] = []

    def node_ids(self) -> list[int]:
        return list(self.answers)

    def send_and_receive(self, message_type: MessageType, contents: Mapping[int, Records],
                         timeout_s: float) -> Iterable[Reply]:
        self.asked.append(message_type)
        for node in contents:
            answer = self.answers[node]
            yield (Reply(node, error=answer) if isinstance(answer, str)
                   else Reply(node, pack(sums=answer)))


def _settings(tmp_path: Path) -> StudySettings:
    protocol = load_protocol("preset:spine_mri_t1w")
    protocol = protocol.model_copy(update={"standardization": protocol.standardization
                                           .model_copy(update={"histogram": HistogramSpec(
                                               scale=250.0)})})
    return StudySettings(protocol, tmp_path, timeout_s=5)


def _sums(scanner: str, top: float, n: int = 6):  # noqa: ANN202
    return scanner_sums([image_measure(scanner, np.linspace(0, top, len(PERCENTILES)))] * n, 5)


def test_the_standard_is_the_mean_of_every_sites_images_and_a_failed_site_is_named(
        tmp_path: Path):
    bad = replace(_sums("X", 250.0), counts=np.array([6, 6]))  # two counts for one scanner
    sites = Sites({1: _sums("GE", 200.0), 2: _sums("Siemens", 250.0, 12), 3: bad,
                   4: "error 500: the site's disk is full"})
    summary = run_images(sites, {1: "site_A", 2: "site_B", 3: "site_C", 4: "site_D"},
                         _settings(tmp_path))
    assert sites.asked == [MessageType.IMAGE_LANDMARKS]
    expected = (6 * np.linspace(0, 200, 13) + 12 * np.linspace(0, 250, 13)) / 18
    np.testing.assert_allclose(summary.standard.landmarks, expected)
    assert set(summary.missing) == {"site_C", "site_D"}
    assert "disk is full" in summary.missing["site_D"]
    written = json.loads((tmp_path / IMAGES_FILE).read_text())
    assert written["standard"]["scanners"]["Siemens"][0] == 12


def test_no_scanner_with_enough_images_stops_the_study(tmp_path: Path):
    few = scanner_sums([image_measure("GE", np.linspace(0, 200, len(PERCENTILES)))] * 2, 5)
    with pytest.raises(StudyStopped, match="enough training images"):
        run_images(Sites({1: few}), {1: "site_A"}, _settings(tmp_path))
