from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.errors import ConfigError
from common.glm import LogisticTerms, site_logistic_terms
from common.messages import StudyConfig
from common.protocol import StudyProtocol, load_protocol
from common.records import PayloadError, from_record, to_record
from harmonization.combat.eb import StackedAdjustments
from harmonization.combat.moments import BatchMoments, DesignMoments, StackedMoments


def test_round_trip_keeps_arrays_and_scalars_exactly():
    rng = np.random.default_rng(0)
    terms = site_logistic_terms(rng.normal(size=(30, 4)), (rng.random(30) < 0.5).astype(float),
                                np.zeros(5))
    back = from_record(to_record(terms), LogisticTerms, {"gradient": (5,), "hessian": (5, 5)})
    assert back.n == 30 and back.loss == terms.loss
    np.testing.assert_array_equal(back.hessian, terms.hessian)
    moments = BatchMoments("scanner A", 12, rng.normal(size=7), rng.random(7))
    again = from_record(to_record(moments), BatchMoments, {"mean": (-1,), "m2": (-1,)})
    assert again.batch == "scanner A" and again.n == 12
    np.testing.assert_array_equal(again.m2, moments.m2)


def test_malformed_payloads_are_refused_naming_field_and_sender():
    good = to_record(DesignMoments(np.array([10, 0]), np.eye(3), np.ones((3, 4))))
    with pytest.raises(PayloadError, match="payload type is 'DesignMoments'"):
        from_record(good, BatchMoments, sender="site_B")
    with pytest.raises(PayloadError, match=r"DesignMoments from site_B: 'xty' has shape \(3, 4\)"):
        from_record(good, DesignMoments, {"xty": (3, 5)}, sender="site_B")
    poisoned = to_record(DesignMoments(np.array([10, 0]), np.eye(3), np.full((3, 4), np.nan)))
    with pytest.raises(PayloadError, match="'xty' holds NaN"):
        from_record(poisoned, DesignMoments)
    missing = RecordDict({"arrays": ArrayRecord(), "meta": ConfigRecord(
        {"payload": "DesignMoments", "schema": 1, "none": []})})
    with pytest.raises(PayloadError, match="field 'batch_counts' is missing"):
        from_record(missing, DesignMoments)
    with pytest.raises(PayloadError, match="no 'meta' and 'arrays'"):
        from_record(RecordDict({}), DesignMoments)


def test_stacked_batches_whose_lengths_disagree_are_refused_on_receipt():
    """A site's moments of its shared batches, or the server's adjustments of them, list the
    batches and one row per batch: a reply naming two batches with three rows is refused by
    name, not cut to the shortest."""
    moments = StackedMoments.of([BatchMoments("s1", 6, np.zeros(3), np.ones(3)),
                                 BatchMoments("s2", 7, np.ones(3), np.ones(3))], 3)
    assert [m.batch for m in from_record(to_record(moments), StackedMoments).unstack()] == [
        "s1", "s2"]
    content = to_record(moments)
    content["meta"]["t.batches"] = ["s1"]
    with pytest.raises(PayloadError, match="StackedMoments from a site: stacked moments of 1 "
                                           "batches hold 2 counts"):
        from_record(content, StackedMoments)
    adjustments = StackedAdjustments(("s1", "s2"), np.zeros((2, 3)), np.ones((2, 3)))
    content = to_record(adjustments)
    content["arrays"]["delta"] = Array(np.ones((3, 3)))
    with pytest.raises(PayloadError, match="2 batches hold 2 gammas and 3 deltas"):
        from_record(content, StackedAdjustments, sender="the server")


def test_a_message_names_the_split_it_works_on_and_the_site_refuses_one_the_study_lacks():
    protocol = load_protocol("preset:spine_mri_t1w")
    study = StudyConfig.of(protocol)
    assert StudyConfig.from_mapping(study.to_mapping()).split(protocol) == 0
    repeated = StudyProtocol.model_validate({
        **protocol.model_dump(), "validation": {"repeats": 4},
        "model": {**protocol.model.model_dump(), "cv_folds": 3}})
    second = StudyConfig.from_mapping(StudyConfig.of(repeated, repeat=2).to_mapping())
    assert second.repeat == 2 and second.split(repeated) == 2
    for bad, study_of in ((4, repeated), (1, protocol), (-1, repeated)):
        with pytest.raises(ConfigError, match=f"'repeat' {bad} is not one of the study's"):
            StudyConfig.of(study_of, repeat=bad).split(study_of)
    with pytest.raises(ConfigError, match="malformed"):
        StudyConfig.from_mapping({**study.to_mapping(), "repeat": "second"})
