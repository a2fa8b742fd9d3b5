"""The site's privacy guard: every reply is held to a declared schema before it leaves.

:func:`check_reply` runs in a Flower mod around every handler of the ClientApp
(:func:`client.app.privacy_guard`, outside local differential privacy, so it checks what
actually leaves). For each message type it knows the records a reply may hold and what each may
contain:

- a payload dataclass (:mod:`common.records`) is held to its own declaration
  (:func:`common.records.check_sent`): no field it does not declare, every array axis of a size
  named in data-independent terms (``features``, the design's ``columns`` and ``batches``, the
  request's ``fits``...), which this module resolves from the request, the protocol and the
  width of the site's feature table, never from its patient counts; counts of 1 to a protocol
  minimum - 1 refused;
- a test-metrics table (JSON) holds exactly the requested models, the metric keys of
  :mod:`common.metrics`, a calibration curve of at most ``n_bins`` bins of at least
  ``min_count`` patients and a decision curve at the protocol's thresholds;
- a CNN update holds the weights it was sent (names and shapes) and named scalar metrics.

A reply that breaks its schema, or a message type the guard does not know, is withheld: the
coordinator gets an error reply naming the rule, and the site's log says what was withheld. An
error reply passes (it carries a code and a short reason). The guard fails closed: if it cannot
check a reply, the reply does not leave.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from client.guard_metrics import PrivacyGuardError, check_table, number
from common.messages import SEGMENTATION, STUDY_RECORD, MessageType, StudyConfig
from common.payloads import (
    MIN_ROWS_SENT,
    HandshakeReply,
    ModelMetrics,
    PrepareReply,
    SplitMetrics,
    evaluated_models,
)
from common.protocol import StudyProtocol
from common.records import PayloadError, check_sent, unpack
from common.selection.model import LinearModel
from common.selection.screening import Comoments
from common.selection.terms import BatchRequest, BatchTerms
from harmonization.combat.design import design_from_json
from harmonization.combat.moments import DesignMoments, ResidualMoments, StackedMoments
from harmonization.covbat import PrincipalAxes, ResidualProducts, score_design
from harmonization.federated_harmony import REPLY_NAMES, STEP_REPLIES, HarmonyRequest
from harmonization.images import AXES, PERCENTILES, ImageSums
from harmonization.messages import HarmonizedRows

#: The most scanners one site's image landmarks may name.
MAX_SCANNERS = 64

#: Flower's ``RecordDict`` (duck-typed: only the apps import Flower).
Records = Any


#: Each query's reply: its payloads by the name they are packed under ("" = unprefixed), with
#: whether each must be there.
PAYLOADS: dict[MessageType, dict[str, tuple[type, bool]]] = {
    MessageType.HANDSHAKE: {"": (HandshakeReply, True)},
    MessageType.IMAGE_LANDMARKS: {"sums": (ImageSums, True)},
    MessageType.PREPARE: {"": (PrepareReply, True)},
    MessageType.COMBAT_DESIGN: {"moments": (DesignMoments, True)},
    MessageType.COMBAT_RESIDUALS: {"residuals": (ResidualMoments, True)},
    MessageType.COMBAT_MOMENTS: {"moments": (StackedMoments, True)},
    MessageType.COMBAT_APPLY: {"result": (HarmonizedRows, True)},
    MessageType.COVBAT_PRODUCTS: {"products": (ResidualProducts, True)},
    MessageType.MODEL_SUMMARY: {"moments": (Comoments, True), "local": (LinearModel, False)},
    MessageType.MODEL_TERMS: {"terms": (BatchTerms, True)},
    MessageType.MODEL_EVALUATE: {"metrics": (ModelMetrics, True)},
    MessageType.HARMONY_PRODUCTS: {"products": (ResidualProducts, True)},
    # one of them, the step's (check_reply)
    MessageType.HARMONY: {name: (cls, False) for cls, name in REPLY_NAMES.items()}}


Sizes = tuple[dict[str, Any], dict[str, int]]


def _sizes(message_type: MessageType, request: Records, protocol: Callable[[], StudyProtocol],
           features: Callable[[], int | None], min_patients: int) -> Sizes:
    """The axis sizes and count minimums a reply may have, resolved from the request
    and the protocol (and the number of feature columns, the same at every site); ComBat's
    ``min_cell`` never below the site's own ``min_patients``."""
    minimums = {"min_rows": MIN_ROWS_SENT, "min_patients": min_patients}
    if message_type is MessageType.PREPARE:
        width = features()
        return {"features": {0} if width is None else {0, width}}, minimums
    if message_type is MessageType.IMAGE_LANDMARKS:
        # how many scanners a site has is not a patient count (the preparation's reply
        # names them too)
        return ({"scanners": range(MAX_SCANNERS + 1), "small": range(MAX_SCANNERS + 1),
                 "landmarks": len(PERCENTILES), "axes": len(AXES)}, minimums)
    if message_type.is_combat:
        study = StudyConfig.from_mapping(dict(request[STUDY_RECORD]))
        design, options = design_from_json(str(study.design))
        shared = study.shared_batches or ()
        width = _required(features())
        if "axes.meta" in request:  # CovBat's rounds on the scores: as many as the axes
            axes = unpack(request, "axes", PrincipalAxes, {"mean": (width,),
                                                           "components": (width, -1)},
                          sender="the server")
            design, width = score_design(design), axes.components.shape[1]
        return ({"features": width, "batches": design.n_batch,
                 "columns": design.n_columns, "shared": range(len(shared) + 1)},
                minimums | {"min_cell": max(options.min_cell, min_patients)})
    if message_type is MessageType.HARMONY_PRODUCTS:  # the network's embedding width
        spec = protocol().cnn
        width = 0 if spec is None else spec.embedding_width
        return {"features": width}, minimums | {"min_cell": max(min_patients, MIN_ROWS_SENT)}
    if message_type is MessageType.HARMONY:
        clusters = _harmony_request(request).clusters
        spec = protocol().harmonization.embeddings
        dims = 0 if spec is None else spec.n_components
        return ({"clusters": clusters, "dims": range(1, dims + 1), "centres":
                 range(2 * clusters + 1), "site_scanners": range(MAX_SCANNERS + 1)}, minimums)
    if message_type is MessageType.MODEL_SUMMARY:
        top_k = protocol().model.screening_top_k
        return ({"features": _required(features()), "terms": range(top_k + 1),
                 "coefficients": range(1, top_k + 2)}, minimums)
    if message_type is MessageType.MODEL_TERMS:
        fits, coefficients = unpack(request, "request", BatchRequest,
                                    sender="the server").beta.shape
        return {"fits": fits, "coefficients": coefficients}, minimums
    return {}, minimums


def _harmony_request(request: Records) -> HarmonyRequest:
    return unpack(request, "request", HarmonyRequest, sender="the server")


def _required(width: int | None) -> int:
    if width is None:
        raise PrivacyGuardError("this site has no prepared feature table to size the reply by")
    return width


def check_reply(message_type: str, request: Records, content: Records,
                protocol: Callable[[], StudyProtocol], features: Callable[[], int | None],
                site: str = "this site", min_patients: int = MIN_ROWS_SENT) -> None:
    """Raise :class:`PrivacyGuardError` unless ``content``, a reply to a message of type
    ``message_type`` with ``request`` content, follows its schema. ``protocol`` and
    ``features`` (the width of the site's feature table, None before the preparation) are
    called when needed; ``min_patients`` is the site's own floor (its site config)."""
    try:
        kind = MessageType(message_type)
    except ValueError:
        raise PrivacyGuardError(f"no schema for a reply to '{message_type}'") from None
    if kind in (MessageType.TRAIN, MessageType.EVALUATE):
        phase = (StudyConfig.from_mapping(dict(request[STUDY_RECORD])).phase
                 if STUDY_RECORD in request else None)
        _check_cnn(kind, request, content, segmentation_metric_names(kind, protocol())
                   if phase == SEGMENTATION else cnn_metric_names(kind))
        return
    schema = PAYLOADS[kind]
    if kind is MessageType.HARMONY:  # the reply of the request's step, and no other
        step = STEP_REPLIES.get(_harmony_request(request).step)
        schema = {n: (c, True) for n, (c, _) in schema.items() if c is step}
    expected = {f"{name}.{part}" if name else part for name in schema
                for part in ("meta", "arrays")}
    extra = sorted(set(content.keys()) - expected)
    if extra:
        raise PrivacyGuardError(f"record '{extra[0]}' is not part of a reply to '{kind}'")
    sizes, minimums = _sizes(kind, request, protocol, features, min_patients)
    for name, (cls, required) in schema.items():
        prefix = f"{name}." if name else ""
        if f"{prefix}meta" not in content and not required:
            continue
        try:
            payload = check_sent(content, cls, sizes, minimums, prefix=prefix, sender=site)
        except PayloadError as exc:
            raise PrivacyGuardError(str(exc)) from None
        if kind is MessageType.COMBAT_APPLY:
            _check_diagnostic(payload, _required(features()))
        elif kind is MessageType.MODEL_EVALUATE:
            study = StudyConfig.from_mapping(dict(request[STUDY_RECORD]))
            names = evaluated_models(list(study.models or ()), bool(study.site_update),
                                     nomogram="radiomics0.meta" in request)
            check_table(payload.table, names, protocol())


def _check_diagnostic(result: HarmonizedRows, width: int) -> None:
    """ComBat's last reply: its scanner diagnostic counts features, at most the table's."""
    counts = (result.differing_before, result.differing_after, result.tested)
    if not all(type(c) is int for c in counts) or not max(counts[:2]) <= counts[2] <= width \
            or min(counts) < 0:
        raise PrivacyGuardError(f"HarmonizedRows: the scanner diagnostic (differing before, "
                                f"after, tested) {counts} is not counts of the {width} features")


def _check_fields(record: Mapping[str, object], name: str, fields: Mapping[str, type]) -> None:
    for key, value in record.items():
        if key not in fields or not isinstance(value, fields[key]) or isinstance(value, bool):
            raise PrivacyGuardError(f"'{name}.{key}' is not a declared {fields.get(key)}")


def cnn_metric_names(kind: str) -> frozenset[str]:
    """The scalar metrics a CNN reply may carry (``train`` or ``evaluate``)."""
    split = [f.name for f in dataclasses.fields(SplitMetrics)]
    dp = {"dp_epsilon", "dp_delta", "dp_noise_std"}
    if kind == "train":
        return frozenset({"num-examples", "train_loss", "train_seconds", "global_seconds",
                          *(f"global_test_{k}" for k in split), *dp})
    return frozenset({"num-examples", "seconds", *(f"{s}_{k}" for s in ("test", "train",
                                                                        "local_test",
                                                                        "finetuned_test",
                                                                        "updated_test")
                                                   for k in split),
                      "finetune_chosen", "held_out_loss_global", "held_out_loss_finetuned",
                      "test_auc_low", "test_auc_high", "test_r_low", "test_r_high"})


def segmentation_metric_names(kind: str, protocol: StudyProtocol) -> frozenset[str]:
    """The scalar metrics a segmentation reply may carry (``train``: the loss and the sums of
    the training masks' shapes; ``evaluate``: per label, Dice and HD95 with their CIs)."""
    # deferred: torch and MONAI, loaded only by the replies of the network's phases
    from common.segmenter import SegmenterLabels, shape_sum_names

    labels = SegmenterLabels.of(protocol)
    if kind == "train":
        return frozenset({"num-examples", "train_loss", "train_seconds",
                          *shape_sum_names(labels)})
    return frozenset({"num-examples", "test_n", "auto_n", "auto_used", "icc_n",
                      "icc_good_share", "icc_median",
                      *(f"label_{v}_{m}{s}" for v in labels.values for m in ("dice", "hd95")
                        for s in ("", "_low", "_high"))})


def _check_cnn(kind: str, request: Records, content: Records, names: frozenset[str]) -> None:
    """A CNN or segmentation reply: the scalar metrics ``names`` allows, the site record and
    (train) the weights it was sent, name for name, with their shapes."""
    allowed = {"metrics", "site"} | ({"arrays"} if kind == "train" else set())
    if not set(content.keys()) <= allowed or "metrics" not in content:
        raise PrivacyGuardError(f"a '{kind}' reply holds {sorted(content.keys())}, not "
                                f"{sorted(allowed)}")
    for key, value in content["metrics"].items():
        if key not in names:
            raise PrivacyGuardError(f"metric '{key}' is not one a '{kind}' reply may carry")
        if not number(value):
            raise PrivacyGuardError(f"metric '{key}' is not one number")
    if "site" in content:
        _check_fields(content["site"], "site", {"name": str, "protocol_hash": str})
    if kind != "train":
        return
    if "arrays" not in content:
        raise PrivacyGuardError("a 'train' reply without its weights")
    sent = {k: tuple(a.shape) for k, a in request["arrays"].items()}
    got = {k: tuple(a.shape) for k, a in content["arrays"].items()}
    if set(got) != set(sent):
        extra = sorted(set(got) ^ set(sent))
        raise PrivacyGuardError(f"the update's weights differ from the network's: {extra[0]}")
    for key, shape in got.items():  # (types may differ: averaging makes counters floats)
        if shape != sent[key]:
            raise PrivacyGuardError(f"weight '{key}' has shape {shape}, the network's "
                                    f"{sent[key]}")
