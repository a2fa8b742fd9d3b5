"""The site's privacy guard: what the site's own code computes passes, and a reply that holds a
per-patient array, an undeclared field, a count under the protocol's minimum, an unknown metric
or a changed network is withheld with the rule it broke. (Every real reply of whole studies
passes it: the simulation and real-process study tests run with it.)

Longer than 400 lines: one test per rule of the guard, for every message type a site answers."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.guard import PrivacyGuardError, check_reply
from client.scoring import metrics_of
from common.messages import EvaluateRequest, MessageType, StudyConfig, StudyRequest
from common.metrics.tables import releasable
from common.payloads import (
    NOMOGRAM_SITE_UPDATED,
    SITE_UPDATED,
    SUPPRESSED,
    HandshakeReply,
    ModelMetrics,
    PrepareReply,
    evaluated_models,
)
from common.protocol import protocol_from_mapping
from common.records import (
    SUPPRESSED_COUNT,
    PayloadError,
    check_sent,
    pack,
    pack_request,
    to_record,
)
from common.selection.model import LinearModel
from common.selection.terms import BatchRequest, BatchTerms, site_batch_terms
from common.synthetic import Task
from common.synthetic.write import study_protocol_mapping
from harmonization.combat.design import CombatOptions, Design, design_to_json
from harmonization.combat.moments import DesignMoments, site_design_moments
from harmonization.covbat import principal_axes, score_design, site_residual_products
from harmonization.images import PERCENTILES, scanner_sums
from harmonization.messages import CombatRequest, HarmonizedRows
from tests.conftest import image_measure

RNG = np.random.default_rng(7)
N, F = 24, 6  # a site's training rows and its features
DIAGNOSIS = protocol_from_mapping(study_protocol_mapping(Task.DIAGNOSIS, "MR"))
PCI = protocol_from_mapping(study_protocol_mapping(Task.PCI, "MR"))


def check(kind: MessageType | str, request: RecordDict, reply: RecordDict,
          protocol=DIAGNOSIS) -> None:  # noqa: ANN001
    check_reply(kind, request, reply, lambda: protocol, lambda: F, "site_A")


def withheld(kind: MessageType | str, request: RecordDict, reply: RecordDict, match: str,
             protocol=DIAGNOSIS) -> None:  # noqa: ANN001
    with pytest.raises(PrivacyGuardError, match=match):
        check(kind, request, reply, protocol)


# --- payloads held to their declaration ---------------------------------------------------------

def combat_round_one(options: CombatOptions) -> tuple[RecordDict, DesignMoments]:
    design = Design(("s1", "s2"), continuous=("age",))
    batch = ["s1"] * 12 + ["s2"] * 12
    y = RNG.normal(size=(N, F))
    moments = site_design_moments(y, batch, {"age": RNG.normal(60, 8, N).tolist()}, design,
                                  options, "site_A")
    request = pack_request(CombatRequest(StudyConfig.of(DIAGNOSIS,
                                                        design=design_to_json(design, options))))
    return request, moments


def test_combat_moments_pass_and_a_per_patient_axis_is_withheld():
    request, moments = combat_round_one(CombatOptions(min_cell=5))
    check(MessageType.COMBAT_DESIGN, request, pack(moments=moments))

    rows = RNG.normal(size=(N, F))  # the patients' own values in place of X'Y (p, F)
    withheld(MessageType.COMBAT_DESIGN, request,
             pack(moments=dataclasses.replace(moments, xty=rows)),
             r"'xty' has shape \(24, 6\), its declaration allows \(columns=3, features=6\)")

    sneaked = pack(moments=moments)  # one more array inside the payload's record
    sneaked["moments.arrays"]["rows"] = Array(rows)
    withheld(MessageType.COMBAT_DESIGN, request, sneaked, "'rows' is not a field of the payload")

    listed = pack(metrics=ModelMetrics("site_A", 40, 20, "{}"))  # a list in a scalar field
    listed["metrics.meta"]["f.n_test"] = RNG.random(40).tolist()
    withheld(MessageType.MODEL_EVALUATE, RecordDict({}), listed, "'n_test' holds a list")
    named = pack(moments=moments)  # the list of absent fields holds something else
    named["moments.meta"]["none"] = ["P001", "P002"]
    withheld(MessageType.COMBAT_DESIGN, request, named, "'P001' is not a field")

    other = pack(moments=moments)  # one more record beside the payload
    other["debug"] = ConfigRecord({"case_ids": ["P001", "P002"]})
    withheld(MessageType.COMBAT_DESIGN, request, other, "record 'debug' is not part of a reply")


def test_a_count_of_fewer_patients_than_the_minimum_cell_is_withheld():
    request, moments = combat_round_one(CombatOptions(min_cell=5))
    small = dataclasses.replace(moments, batch_counts=np.array([3, 21]))
    withheld(MessageType.COMBAT_DESIGN, request, pack(moments=small),
             "'batch_counts' counts 3, fewer than min_cell = 5")
    absent = dataclasses.replace(moments, batch_counts=np.array([0, 24]))  # 0: no such batch
    check(MessageType.COMBAT_DESIGN, request, pack(moments=absent))


def test_a_coordinator_cannot_lower_the_sites_floor():
    """A study that asks for ComBat cells of 1 still gets none under the site's min_patients."""
    request, moments = combat_round_one(CombatOptions(min_cell=1))
    small = pack(moments=dataclasses.replace(moments, batch_counts=np.array([3, 21])))
    with pytest.raises(PrivacyGuardError, match="counts 3, fewer than min_cell = 5"):
        check_reply(MessageType.COMBAT_DESIGN, request, small, lambda: DIAGNOSIS, lambda: F,
                    "site_A")  # the default floor
    check_reply(MessageType.COMBAT_DESIGN, request, small, lambda: DIAGNOSIS, lambda: F,
                "site_A", min_patients=3)  # a site that allows 3


def test_covbat_sums_are_sized_by_the_features_and_the_scores_rounds_by_the_axes():
    request, _ = combat_round_one(CombatOptions(min_cell=5))
    residuals = RNG.normal(size=(N, F))
    products = site_residual_products(residuals)
    check(MessageType.COVBAT_PRODUCTS, request, pack(products=products))
    withheld(MessageType.COVBAT_PRODUCTS, request,
             pack(products=dataclasses.replace(products, products=residuals)),
             r"'products' has shape \(24, 6\), its declaration allows \(features=6, features=6\)")
    withheld(MessageType.COVBAT_PRODUCTS, request,
             pack(products=site_residual_products(residuals[:3])),
             "'n' counts 3, fewer than min_cell = 5")

    # the scores' rounds: two axes, so two columns of sums, under the scores' design (the
    # scanners only: the covariates' effects are out of the residuals)
    axes = principal_axes([products], n_pc=2)
    design = Design(("s1", "s2"), continuous=("age",))
    options = CombatOptions(min_cell=5)
    scores = pack_request(CombatRequest(
        StudyConfig.of(DIAGNOSIS, design=design_to_json(design, options)), axes=axes))
    batch = ["s1"] * 12 + ["s2"] * 12
    moments = site_design_moments(residuals @ axes.components, batch, {}, score_design(design),
                                  options, "site_A")
    check(MessageType.COMBAT_DESIGN, scores, pack(moments=moments))
    full = site_design_moments(residuals, batch, {}, score_design(design), options, "site_A")
    withheld(MessageType.COMBAT_DESIGN, scores, pack(moments=full),
             r"'xty' has shape \(2, 6\), its declaration allows \(columns=2, features=2\)")


def test_image_landmark_sums_pass_and_a_small_scanner_is_named_without_its_count():
    rows = [image_measure("s1", np.linspace(0, 250, len(PERCENTILES)))] * 6 + [
        image_measure("s2", np.linspace(0, 250, len(PERCENTILES)))] * 2
    sums = scanner_sums(rows, min_images=5)
    request = pack_request(StudyRequest(StudyConfig.of(DIAGNOSIS, seed=0, test_fraction=0.3)))
    check(MessageType.IMAGE_LANDMARKS, request, pack(sums=sums))
    assert sums.small == ("s2",)
    few = dataclasses.replace(sums, scanners=("s1", "s2"), counts=np.array([6, 2]),
                              landmarks=np.vstack([sums.landmarks] * 2),
                              noise=np.tile(sums.noise, 2), spacing=np.vstack([sums.spacing] * 2))
    withheld(MessageType.IMAGE_LANDMARKS, request, pack(sums=few),
             "'counts' counts 2, fewer than min_patients = 5")
    per_patient = dataclasses.replace(sums, landmarks=np.zeros((1, 6 * len(PERCENTILES))))
    withheld(MessageType.IMAGE_LANDMARKS, request, pack(sums=per_patient),
             "'landmarks' has shape")
    each_noise = dataclasses.replace(sums, noise=np.full(6, 2.0))  # one per image, not a sum
    withheld(MessageType.IMAGE_LANDMARKS, request, pack(sums=each_noise),
             "'noise' has 6 along axis 'scanners', 'scanners' has 1")


@dataclass(frozen=True)
class Undeclared:
    values: np.ndarray


def test_an_array_its_payload_does_not_declare_cannot_leave():
    with pytest.raises(PayloadError, match="'values' declares no axes"):
        check_sent(to_record(Undeclared(np.zeros(3))), Undeclared, {}, {})


def test_model_terms_follow_the_request_and_fewer_rows_than_the_minimum_are_withheld():
    k = 3
    request = BatchRequest(features=np.array([[0, 2, 4]]), mean=np.zeros((1, k)),
                           sd=np.ones((1, k)), fit_set=np.zeros(4, dtype=int),
                           fit_fold=np.array([-1, 0, 1, 2]), beta=np.zeros((4, 1 + k)))
    x, y = RNG.normal(size=(N, F)), RNG.integers(0, 2, N).astype(float)
    folds = np.arange(N) % 3
    terms = site_batch_terms(x, y, folds, request, "logistic", 5)
    message = pack(request=request)
    check(MessageType.MODEL_TERMS, message, pack(terms=terms))

    per_row = BatchTerms(*(np.resize(a, (N, *a.shape[1:])) for a in dataclasses.astuple(terms)))
    withheld(MessageType.MODEL_TERMS, message, pack(terms=per_row), r"'n' has shape \(24,\)")
    few = dataclasses.replace(terms, n_out=np.array([0.0, 2.0, 8.0, 8.0]))
    withheld(MessageType.MODEL_TERMS, message, pack(terms=few), "'n_out' counts 2, fewer than "
             "min_rows = 5")


def test_a_local_model_has_at_most_the_protocols_screened_features():
    from common.selection.screening import Comoments, site_comoments

    x, y = RNG.normal(size=(N, F)), RNG.integers(0, 2, N).astype(float)
    top_k = DIAGNOSIS.model.screening_top_k
    local = LinearModel(np.arange(3), np.zeros(3), np.ones(3), np.zeros(4))
    check(MessageType.MODEL_SUMMARY, RecordDict({}),
          pack(moments=site_comoments(x, y), local=local))
    check(MessageType.MODEL_SUMMARY, RecordDict({}), pack(moments=site_comoments(x, y)))
    wide = top_k + 1
    withheld(MessageType.MODEL_SUMMARY, RecordDict({}),
             pack(moments=site_comoments(x, y), local=LinearModel(
                 np.arange(wide), np.zeros(wide), np.ones(wide), np.zeros(wide + 1))),
             "'features' has shape")
    few = Comoments(3, *dataclasses.astuple(site_comoments(x, y))[1:])
    withheld(MessageType.MODEL_SUMMARY, RecordDict({}), pack(moments=few),
             "'n' counts 3, fewer than min_rows = 5")


# --- the test-metrics table -------------------------------------------------------------------

def evaluation(protocol, names: list[str], n: int = 40,  # noqa: ANN001
               update: bool = False) -> tuple[RecordDict, dict]:
    y = RNG.integers(0, 2, n).astype(float)
    if protocol is PCI:
        y = RNG.normal(20, 10, n)
    min_count = protocol.validation.min_count
    table = {"models": {name: releasable(metrics_of(protocol, y, y + RNG.normal(0, 1, n), seed=1),
                                         min_count)
                        for name in evaluated_models(names, update, False)},
             "comparisons": {}}
    if update:  # what the site's cross-validation chose, with every candidate's deviance
        table["update"] = {"choice": "revised 0.3", "deviance": {"federated": 41.5,
                                                                 "local": None}}
    request = pack_request(EvaluateRequest(StudyConfig.of(
        protocol, models=tuple(names), site_update=update or None), ()))
    return request, table


def metrics(table: dict) -> RecordDict:
    return pack(metrics=ModelMetrics("site_A", 40, 20, json.dumps(table)))


def test_a_confusion_matrix_cell_under_the_minimum_never_leaves_the_site():
    """One false negative is one patient's predicted class against their label: the attack
    reads it off the table a site used to send; the table it sends now withholds the matrix
    and every metric built from it, and the guard refuses a table that does not."""
    y = np.array([1.0] * 12 + [0.0] * 12)
    score = np.where(y == 1, 2.0, -2.0)
    score[0] = -3.0  # the one positive the model misses
    full = metrics_of(DIAGNOSIS, y, score, seed=1)
    # the attack on the full table: fn = 1, and sensitivity * positives says the same
    assert full["fn"] == 1 and round((1 - full["sensitivity"]) * full["n_positive"]) == 1
    sent = releasable(full, DIAGNOSIS.validation.min_count)
    assert all(np.isnan(sent[k]) for k in ("tp", "fp", "tn", "fn", "sensitivity",
                                           "specificity", "ppv", "npv", "accuracy", "f1"))
    assert sent["auc"] == full["auc"] and sent["threshold"] == full["threshold"]
    request = pack_request(EvaluateRequest(StudyConfig.of(DIAGNOSIS, models=("federated",)), ()))
    check(MessageType.MODEL_EVALUATE, request,
          metrics({"models": {"federated": sent}, "comparisons": {}}))
    withheld(MessageType.MODEL_EVALUATE, request,
             metrics({"models": {"federated": full}, "comparisons": {}}),
             "confusion-matrix cell 'fn' counts 1, fewer than min_count = 5")
    half = {**sent, "sensitivity": full["sensitivity"]}  # the cells withheld, a ratio not
    withheld(MessageType.MODEL_EVALUATE, request,
             metrics({"models": {"federated": half}, "comparisons": {}}),
             "'sensitivity' is sent with its confusion matrix withheld")


def test_a_metrics_table_holds_the_requested_models_and_their_declared_metrics():
    request, table = evaluation(DIAGNOSIS, ["federated", "local"])
    check(MessageType.MODEL_EVALUATE, request, metrics(table))
    request_r, table_r = evaluation(PCI, ["federated"])
    check(MessageType.MODEL_EVALUATE, request_r, metrics(table_r), PCI)

    scores = json.loads(json.dumps(table))
    scores["models"]["federated"]["scores"] = RNG.random(40).tolist()  # per-patient scores
    withheld(MessageType.MODEL_EVALUATE, request, metrics(scores), "holds other metrics than its "
             "task's: scores")
    other = {"models": {**table["models"], "site_B's": table["models"]["local"]},
             "comparisons": {}}
    withheld(MessageType.MODEL_EVALUATE, request, metrics(other), "are not the requested")


def test_the_site_updated_model_is_sent_only_where_the_request_asks_for_it():
    request, table = evaluation(DIAGNOSIS, ["federated", "local"], update=True)
    assert set(table["models"]) == {"federated", "local", SITE_UPDATED}
    check(MessageType.MODEL_EVALUATE, request, metrics(table))
    missing = {"models": {k: v for k, v in table["models"].items() if k != SITE_UPDATED},
               "comparisons": {}, "update": table["update"]}
    withheld(MessageType.MODEL_EVALUATE, request, metrics(missing), "are not the requested")
    # the update's summary: a candidate's name, never free text (the reason of a failed update
    # stays at the site), and a number or None per candidate
    for bad, why in ((None, "'update' must hold"),
                     ({"choice": "federated (the update failed: 3 patients)", "deviance": {}},
                      "not one of the candidates"),
                     ({"choice": "local", "deviance": {"federated": "41"}}, "not a number"),
                     ({"choice": "local", "deviance": {"patient 7": 1.0}}, "not a number")):
        withheld(MessageType.MODEL_EVALUATE, request, metrics({**table, "update": bad}), why)
    withheld(MessageType.MODEL_EVALUATE, request, metrics(
        {k: v for k, v in table.items() if k != "update"}), "must hold")
    plain, _ = evaluation(DIAGNOSIS, ["federated", "local"])
    withheld(MessageType.MODEL_EVALUATE, plain, metrics(table), "must hold")
    one = (LinearModel(np.arange(1), np.zeros(1), np.ones(1), np.zeros(2)),)
    nomogram = pack_request(EvaluateRequest(StudyConfig.of(  # a nomogram's: the nomogram's
        DIAGNOSIS, models=("nomogram",), site_update=True), one, one))
    row = table["models"]["federated"]
    check(MessageType.MODEL_EVALUATE, nomogram, metrics(
        {"models": {"nomogram": row, NOMOGRAM_SITE_UPDATED: row}, "comparisons": {},
         "update": table["update"]}))
    for wrong in ({"nomogram": row}, {"nomogram": row, SITE_UPDATED: row}):
        withheld(MessageType.MODEL_EVALUATE, nomogram, metrics(
            {"models": wrong, "comparisons": {}, "update": table["update"]}),
                 "are not the requested")


def test_curves_keep_the_protocols_bins_and_thresholds():
    request, table = evaluation(DIAGNOSIS, ["federated"])
    v = DIAGNOSIS.validation
    curve = table["models"]["federated"]["calibration_curve"]
    assert curve and all(row[0] >= v.min_count for row in curve)
    fine = json.loads(json.dumps(table))
    fine["models"]["federated"]["calibration_curve"] = [[1, 0.5, 1.0]] + curve[1:]
    withheld(MessageType.MODEL_EVALUATE, request, metrics(fine),
             f"a calibration bin of 1 patients, fewer than min_count = {v.min_count}")
    dropped = json.loads(json.dumps(table))
    dropped["models"]["federated"]["decision_curve"].pop()
    withheld(MessageType.MODEL_EVALUATE, request, metrics(dropped),
             "not at the protocol's thresholds")


def test_a_survival_table_is_the_protocols_times_and_groups_of_at_least_the_minimum():
    from client.scoring import survival_metrics_of

    pfs = protocol_from_mapping(study_protocol_mapping(Task.PFS, "MR"))

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        score = RNG.normal(size=n)
        time = RNG.exponential(40 * np.exp(-score))
        censored = RNG.uniform(12, 84, n)
        return np.column_stack([np.minimum(time, censored), time <= censored]), score

    (y, score), (train_y, train_score) = rows(40), rows(80)
    row = survival_metrics_of(pfs, y, score, train_y, train_score, seed=1)
    table = json.loads(json.dumps({"models": {"federated": row}, "comparisons": {}}))
    request = pack_request(EvaluateRequest(StudyConfig.of(pfs, models=("federated",)), ()))
    check(MessageType.MODEL_EVALUATE, request, metrics(table), pfs)
    curve = table["models"]["federated"]["kaplan_meier"]["high"]
    assert None in curve["at_risk"]  # the late grid times: too few left at risk

    def changed(edit) -> dict:  # noqa: ANN001
        copy = json.loads(json.dumps(table))
        edit(copy["models"]["federated"])
        return copy

    def late_value(m: dict) -> None:  # a value where too few are at risk
        curve = m["kaplan_meier"]["high"]
        curve["survival"][curve["at_risk"].index(None)] = 0.5

    def few_at_risk(m: dict) -> None:
        curve = m["kaplan_meier"]["high"]
        curve["at_risk"][-1], curve["survival"][-1] = 2, 0.5

    def small_group(m: dict) -> None:
        m["calibration_at"][0][2] = 3

    def other_times(m: dict) -> None:
        m["auc_at"][0][0] = 7.0

    def per_patient(m: dict) -> None:
        m["kaplan_meier"]["high"]["survival"] += [0.9]

    for edit, why in ((late_value, "a value where fewer than min_count are at risk"),
                      (few_at_risk, "counts 2 at risk, fewer than min_count = 5"),
                      (small_group, "a risk group of 3 patients"),
                      (other_times, "'auc_at' is not one number at each protocol time"),
                      (per_patient, "not one value per grid time")):
        withheld(MessageType.MODEL_EVALUATE, request, metrics(changed(edit)), why, pfs)


# --- the CNN ----------------------------------------------------------------------------------

def network() -> ArrayRecord:
    return ArrayRecord({"conv.weight": Array(np.zeros((4, 1, 3, 3, 3), np.float32)),
                        "bn.num_batches_tracked": Array(np.array(3, np.int64))})


def train_reply(arrays: ArrayRecord, **metrics: object) -> RecordDict:
    return RecordDict({"arrays": arrays,
                       "metrics": MetricRecord({"num-examples": 20, "train_loss": 0.7,
                                                **metrics}),
                       "site": ConfigRecord({"name": "site_A", "protocol_hash": "h"})})


def test_a_cnn_update_is_the_network_it_was_sent_with_named_scalar_metrics():
    request = RecordDict({"arrays": network()})
    check(MessageType.TRAIN, request, train_reply(network(), dp_epsilon=1.0, global_test_auc=0.5))
    bigger = network()
    bigger["conv.weight"] = Array(np.zeros((5, 1, 3, 3, 3), np.float32))
    withheld(MessageType.TRAIN, request, train_reply(bigger),
             r"weight 'conv.weight' has shape \(5, 1, 3, 3, 3\)")
    extra = network()
    extra["features"] = Array(np.zeros((20, 512), np.float32))  # the crops' embeddings
    withheld(MessageType.TRAIN, request, train_reply(extra), "differ from the network's: features")
    withheld(MessageType.TRAIN, request, train_reply(network(), **{"prediction_0": 0.3}),
             "metric 'prediction_0' is not one")
    withheld(MessageType.TRAIN, request, train_reply(network(), global_test_auc=[0.1, 0.9]),
             "metric 'global_test_auc' is not one number")


def test_a_segmentation_reply_carries_its_sums_and_dice_per_label_and_nothing_else():
    from common.messages import SEGMENTATION, STUDY_RECORD, StudyConfig
    from common.protocol import SegmentationSpec

    protocol = DIAGNOSIS.model_copy(update={"segmentation": SegmentationSpec()})
    study = ConfigRecord(StudyConfig.of(protocol, phase=SEGMENTATION).to_mapping())
    request = RecordDict({"arrays": network(), STUDY_RECORD: study})
    sums = {"masks": 20.0, "label_1_volume_sum": 900.0, "label_1_volume_sumsq": 4.1e4,
            "label_1_parts_sum": 60.0, "label_2_volume_sum": 1200.0,
            "label_2_volume_sumsq": 7.3e4, "label_2_parts_sum": 40.0}
    check(MessageType.TRAIN, request, train_reply(network(), train_seconds=3.0, **sums),
          protocol)
    # a CNN's metric is not a segmentation reply's, nor is one case's volume
    withheld(MessageType.TRAIN, request, train_reply(network(), global_test_auc=0.5),
             "metric 'global_test_auc' is not one", protocol)
    withheld(MessageType.TRAIN, request, train_reply(network(), label_1_volume_case_3=41.0),
             "metric 'label_1_volume_case_3' is not one", protocol)
    scores = {"test_n": 7, "auto_n": 0, "auto_used": 0, "label_1_dice": 0.9,
              "label_1_dice_low": 0.85, "label_1_dice_high": 0.93, "label_2_hd95": 3.0}
    evaluated = RecordDict({"metrics": MetricRecord({"num-examples": 7, **scores}),
                            "site": ConfigRecord({"name": "site_A", "protocol_hash": "h"})})
    check(MessageType.EVALUATE, request, evaluated, protocol)
    evaluated["metrics"]["label_3_dice"] = 0.5  # a label the protocol does not have
    withheld(MessageType.EVALUATE, request, evaluated, "metric 'label_3_dice'", protocol)


def test_replies_to_unknown_messages_are_withheld():
    withheld("query.export_rows", RecordDict({}), RecordDict({}), "no schema")
    request, _ = combat_round_one(CombatOptions(min_cell=3))
    check(MessageType.COMBAT_APPLY, request, pack(result=HarmonizedRows(30)))
    listed = pack(result=HarmonizedRows(30))
    listed["result.meta"]["t.case_ids"] = ["P1"]
    withheld(MessageType.COMBAT_APPLY, request, listed, "'t.case_ids' is not a field")
    withheld(MessageType.COMBAT_APPLY, request,
             RecordDict({"result": ConfigRecord({"rows": 30})}), "record 'result' is not part")


def test_the_scanner_diagnostic_leaves_as_counts_of_features_only():
    """ComBat's last reply carries how many features differ between the site's scanners: counts
    of at most the feature table's width, never a value of another kind in their place."""
    request, _ = combat_round_one(CombatOptions(min_cell=3))
    check(MessageType.COMBAT_APPLY, request, pack(result=HarmonizedRows(30, F, 3, 1)))
    for smuggled in (HarmonizedRows(30, F + 1, 3, 1), HarmonizedRows(30, F, 3, F + 1),
                     HarmonizedRows(30, 2, 3, 1), HarmonizedRows(30, F, -1, 0)):
        withheld(MessageType.COMBAT_APPLY, request, pack(result=smuggled), "not counts")
    floated = pack(result=HarmonizedRows(30, F, 3, 1))
    floated["result.meta"]["f.differing_after"] = 2.75  # a patient's value in its place
    withheld(MessageType.COMBAT_APPLY, request, floated, "not counts")


# --- the mod ----------------------------------------------------------------------------------

def test_the_mod_withholds_a_bad_reply_and_says_why(caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch):
    """Through the ClientApp's mod, with Flower's messages."""
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import SITE_REFUSED, privacy_guard

    # Flower makes messages inside a run only: this process plays a run's ClientApp
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 2)
    monkeypatch.setattr(TaskIdentity, "_task_id", 3)
    mod = privacy_guard(lambda _: "site_A", lambda *_: F)
    message = Message(RecordDict({"arrays": network()}), dst_node_id=2,
                      message_type=MessageType.TRAIN)
    good = mod(message, None, lambda m, _: Message(train_reply(network()), reply_to=m))
    assert not good.has_error() and "arrays" in good.content
    extra = network()
    extra["features"] = Array(np.zeros((20, 512), np.float32))
    with caplog.at_level(logging.ERROR, "myelofed.site"):
        bad = mod(message, None, lambda m, _: Message(train_reply(extra), reply_to=m))
    assert bad.has_error() and bad.error.code == SITE_REFUSED
    assert bad.error.reason.startswith("PrivacyGuardError: reply withheld: the update's")
    assert "the reply to train is withheld" in caplog.text


# --- counts in the handshake and preparation replies --------------------------------------------

def test_counts_under_the_minimum_leave_only_as_suppressed():
    """The issue's strings ("X_3T:3", "0:10,1:1", "mask_empty:1") and small count fields are
    withheld; a suppressed count passes; a count field holds name:count pairs and nothing else."""
    h = DIAGNOSIS.content_hash()
    for reply in (HandshakeReply("site_A", "ok", h, n_rows=14, n_usable=14,
                                 label_counts="0:10,1:1"),
                  HandshakeReply("site_A", "ok", h, n_rows=14, n_usable=3),
                  PrepareReply("site_A", "ok", n_train=20, n_test=6, batches="X_3T:3"),
                  PrepareReply("site_A", "ok", n_train=20, n_test=6, skipped="mask_empty:1")):
        kind = MessageType.HANDSHAKE if isinstance(reply, HandshakeReply) else \
            MessageType.PREPARE
        withheld(kind, RecordDict({}), to_record(reply), "fewer than min_patients = 5")
    check(MessageType.HANDSHAKE, RecordDict({}), to_record(HandshakeReply(
        "site_A", "ok", h, n_rows=14, n_usable=14, label_counts=f"0:10,1:{SUPPRESSED}")))
    withheld(MessageType.PREPARE, RecordDict({}),
             to_record(PrepareReply("site_A", "ok", n_train=20, n_test=6,
                                    skipped="case P001 has no mask")),
             "'skipped' must be name:count pairs")
    withheld(MessageType.PREPARE, RecordDict({}),
             to_record(PrepareReply("site_A", "ok", n_train=20, n_test=-3)),
             "a negative count other than -1")
    assert SUPPRESSED == SUPPRESSED_COUNT
    # the site's own floor: a site that allows 3 sends its 3
    check_reply(MessageType.PREPARE, RecordDict({}), to_record(PrepareReply(
        "site_A", "ok", n_train=20, n_test=6, batches="X_3T:3")), lambda: DIAGNOSIS,
        lambda: F, "site_A", min_patients=3)


def test_harmony_replies_are_sums_by_cluster_and_scanner_and_the_steps_own():
    """Federated Harmony on the CNN's embeddings: the first round's sums are sized by the
    network's embedding width; each later reply is the step's payload, sized by the request's
    clusters and the protocol's components, with no per-case axis and no count under the
    floor."""
    from common.protocol import EmbeddingHarmonySpec, HarmonizationSpec
    from harmonization.federated_harmony import HarmonyRequest, HarmonySite, ScannerCounts
    from harmonization.messages import EmbeddingHarmonyRequest

    protocol = DIAGNOSIS.model_copy(update={"harmonization": HarmonizationSpec(
        embeddings=EmbeddingHarmonySpec(n_components=3))})
    study = StudyConfig.of(protocol, seed=1)
    width = protocol.cnn.embedding_width
    embeddings = RNG.normal(size=(N, width))
    first = pack_request(EmbeddingHarmonyRequest(study))
    check(MessageType.HARMONY_PRODUCTS, first,
          pack(products=site_residual_products(embeddings)), protocol)
    withheld(MessageType.HARMONY_PRODUCTS, first,
             pack(products=site_residual_products(embeddings[:, :5])),
             r"'total' has shape \(5,\), its declaration allows \(features=128\)", protocol)

    def ask(request: HarmonyRequest) -> RecordDict:
        return pack_request(EmbeddingHarmonyRequest(study, None, request))

    site = HarmonySite(RNG.normal(size=(N, 3)), ["s1"] * 12 + ["s2"] * 12)
    site.join(["s0", "s1", "s2"])
    counts = ask(HarmonyRequest("counts"))
    check(MessageType.HARMONY, counts, pack(counts=site.scanner_counts()), protocol)
    withheld(MessageType.HARMONY, counts, pack(counts=ScannerCounts(("s1",), np.array([3]))),
             "'counts' counts 3, fewer than min_patients = 5", protocol)
    centroids = np.eye(3)[:2]
    start = ask(HarmonyRequest("start", clusters=2, centroids=centroids))
    masses = site.start(centroids)
    check(MessageType.HARMONY, start, pack(masses=masses), protocol)
    withheld(MessageType.HARMONY, start, pack(ridge=site.ridge()),
             "record 'ridge.arrays' is not part of a reply", protocol)  # not this step's
    withheld(MessageType.HARMONY, start,
             pack(masses=dataclasses.replace(masses, observed=site._r)),  # per case
             r"'observed' has shape \(24, 2\), its declaration allows", protocol)
    ridge = ask(HarmonyRequest("ridge", clusters=2))
    check(MessageType.HARMONY, ridge, pack(ridge=site.ridge()), protocol)
