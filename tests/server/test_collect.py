from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from common.glm import FeatureMoments
from common.records import pack
from server.app import collect


def test_a_malformed_reply_excludes_that_site_by_name_and_keeps_the_others():
    good = FeatureMoments(20, np.zeros(4), np.ones(4))
    wrong_shape = FeatureMoments(20, np.zeros(5), np.ones(5))
    poisoned = FeatureMoments(20, np.full(4, np.nan), np.ones(4))
    # collect reads only a reply's content: a stand-in for Flower's Message does
    replies = {site: SimpleNamespace(content=pack(moments=payload))
               for site, payload in (("A", good), ("B", wrong_shape), ("C", poisoned))}
    failed: dict[str, str] = {}
    kept = collect(replies, failed, "moments", FeatureMoments, {"mean": (4,), "m2": (4,)})
    assert list(kept) == ["A"]
    assert "'mean' has shape (5,), expected (4,)" in failed["B"]
    assert "'mean' holds NaN" in failed["C"]


def test_flowers_errors_for_silent_nodes_are_given_to_the_silent_sites():
    from server.app import _unanswered

    lost = "error 5: Node Unavailable"
    assert _unanswered({"C"}, [lost], 60) == [("C", lost)]
    assert _unanswered({"B", "C"}, [], 60) == [("B", "no reply within 60 s"),
                                               ("C", "no reply within 60 s")]
    # two silent sites, one error from Flower: which is which is unknown, both are told
    assert _unanswered({"B", "C"}, [lost], 60) == [
        ("B", f"no reply within 60 s ({lost})"), ("C", f"no reply within 60 s ({lost})")]
