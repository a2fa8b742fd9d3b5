"""Local differential privacy on the CNN's updates: the noise follows the Gaussian mechanism,
and an update that does not state it was noised as the protocol says is refused. (What leaves a
site, measured against the noise, and each site's spend across a restart:
``test_resume.py``.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from common.protocol import LocalDpSpec
from server.phases.cnn import privacy
from server.strategy import bad_update

DP = LocalDpSpec(epsilon=1.0, delta=1e-5, clipping_norm=0.01)


def test_the_noise_follows_the_gaussian_mechanism():
    # sigma = 2 C sqrt(2 ln(1.25 / delta)) / epsilon
    assert DP.noise_std == pytest.approx(2 * 0.01 * np.sqrt(2 * np.log(1.25e5)))
    with pytest.raises(ValueError):
        LocalDpSpec(epsilon=2.0)  # the classical analysis holds for epsilon <= 1


def reply(metrics: dict) -> SimpleNamespace:
    """A train reply as bad_update reads it (a stand-in for Flower's Message)."""
    weights = {"w": SimpleNamespace(numpy=lambda: np.zeros((2, 3), np.float32))}
    return SimpleNamespace(content={"arrays": weights, "metrics": {"num-examples": 10, **metrics},
                                    "site": {"protocol_hash": "h"}})


def test_an_update_must_state_the_protocols_noise():
    expected = {"w": ((2, 3), "float32")}
    stated = {"dp_epsilon": 1.0, "dp_delta": 1e-5}
    assert bad_update(reply(stated), expected, "h", DP) == ""
    assert "not noised with the protocol's local DP" in bad_update(reply({}), expected, "h", DP)
    weaker = {"dp_epsilon": 5.0, "dp_delta": 1e-5}
    assert "not noised" in bad_update(reply(weaker), expected, "h", DP)
    assert bad_update(reply({}), expected, "h", None) == ""  # no DP asked, none stated


def test_each_site_spends_epsilon_for_every_update_it_sent():
    records = {"history": {"1": {"A": {}, "B": {}}, "2": {"A": {}}},
               "left_out": [{"round": 2, "site": "B", "kind": "excluded", "reason": "x"},
                            {"round": 3, "site": "A", "kind": "dropped", "reason": "y"}]}
    disclosed = privacy(DP, records)
    # B's refused update was sent all the same; A's dropped round sent nothing
    assert disclosed["per_site"] == {"A": {"rounds": 2, "epsilon": 2.0, "delta": 2e-5},
                                   "B": {"rounds": 2, "epsilon": 2.0, "delta": 2e-5}}
    assert privacy(None, records) == {"mechanism": "none"}
