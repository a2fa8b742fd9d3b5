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
import json
from collections.abc import Callable, Mapping
from typing import Any

from common.errors import MyeloFedError
from common.messages import SEGMENTATION, STUDY_RECORD, MessageType, StudyConfig
from common.metrics.survival import MAX_RISK_GROUPS, RISK_GROUPS
from common.metrics.tables import (
    CLASSIFICATION_KEYS,
    CONFUSION_CELLS,
    REGRESSION_KEYS,
    SURVIVAL_KEYS,
    THRESHOLD_METRICS,
    PairedTest,
    small_cells,
)
from common.payloads import (
    MIN_ROWS_SENT,
    NOMOGRAM_SITE_UPDATED,
    SITE_UPDATED,
    HandshakeReply,
    ModelMetrics,
    PrepareReply,
    SplitMetrics,
    evaluated_models,
)
from common.protocol import StudyProtocol, TaskKind, ValidationSpec
from common.records import PayloadError, check_sent, unpack
from common.selection.model import LinearModel
from common.selection.screening import Comoments
from common.selection.terms import BatchRequest, BatchTerms
from common.selection.updating import candidates
from harmonization.combat.design import design_from_json
from harmonization.combat.moments import DesignMoments, ResidualMoments, StackedMoments
from harmonization.covbat import PrincipalAxes, ResidualProducts, score_design
from harmonization.images import AXES, PERCENTILES, ImageSums
from harmonization.messages import HarmonizedRows

#: The most scanners one site's image landmarks may name.
MAX_SCANNERS = 64

#: Flower's ``RecordDict`` (duck-typed: only the apps import Flower).
Records = Any


class PrivacyGuardError(MyeloFedError):
    """A reply does not follow what may leave the site."""


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
    MessageType.MODEL_EVALUATE: {"metrics": (ModelMetrics, True)}}


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
    if message_type is MessageType.MODEL_SUMMARY:
        top_k = protocol().model.screening_top_k
        return ({"features": _required(features()), "terms": range(top_k + 1),
                 "coefficients": range(1, top_k + 2)}, minimums)
    if message_type is MessageType.MODEL_TERMS:
        fits, coefficients = unpack(request, "request", BatchRequest,
                                    sender="the server").beta.shape
        return {"fits": fits, "coefficients": coefficients}, minimums
    return {}, minimums


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
            _check_table(payload.table, names, protocol())


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


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_table(text: str, names: list[str], protocol: StudyProtocol) -> None:
    """A site's test metrics (:class:`common.payloads.ModelMetrics`): numbers of the requested
    models under the keys :mod:`common.metrics` writes, curves as the protocol bounds them."""
    def fail(reason: str) -> PrivacyGuardError:
        return PrivacyGuardError(f"the metrics table: {reason}")

    table = json.loads(text)
    updated = SITE_UPDATED in names or NOMOGRAM_SITE_UPDATED in names
    expected = {"models", "comparisons", *(["update"] if updated else [])}
    if not isinstance(table, dict) or set(table) != expected:
        raise fail(f"it must hold {' and '.join(repr(k) for k in sorted(expected))} only")
    if updated:
        _check_update(table["update"], fail)
    models, comparisons = table["models"], table["comparisons"]
    if not isinstance(models, dict) or set(models) != set(names):
        raise fail(f"its models {sorted(models)} are not the requested {sorted(names)}")
    classification = protocol.task.kind is TaskKind.CLASSIFICATION
    survival = protocol.task.kind is TaskKind.SURVIVAL
    keys = (CLASSIFICATION_KEYS if classification else SURVIVAL_KEYS if survival
            else REGRESSION_KEYS)
    v = protocol.validation
    for name, metrics in models.items():
        if not isinstance(metrics, dict) or set(metrics) != keys:
            extra = sorted(set(metrics) - keys) if isinstance(metrics, dict) else []
            raise fail(f"model '{name}' holds other metrics than its task's{': ' if extra else ''}"
                       f"{', '.join(extra)}")
        if survival:
            _check_survival(name, metrics, v, fail)
            continue
        for key, value in metrics.items():
            if key == "calibration_curve":
                _check_curve(name, key, value, v.n_bins, fail)
                small = [row[0] for row in value if row[0] < v.min_count]
                if small:
                    raise fail(f"model '{name}': a calibration bin of {small[0]} patients, "
                               f"fewer than min_count = {v.min_count}")
            elif key == "decision_curve":
                _check_curve(name, key, value, len(v.decision_thresholds), fail)
                if [row[0] for row in value] != [float(t) for t in v.decision_thresholds]:
                    raise fail(f"model '{name}': the decision curve is not at the protocol's "
                               "thresholds")
            elif not _number(value):
                raise fail(f"model '{name}': '{key}' is not a number")
        if classification:
            _check_confusion(name, metrics, v.min_count, fail)
    allowed = {f"{names[0]} vs {other}" for other in names[1:]} if names else set()
    fields = {f.name for f in dataclasses.fields(PairedTest)}
    if not isinstance(comparisons, dict):
        raise fail("'comparisons' is not a mapping")
    for key, test in comparisons.items():
        if key not in allowed or not isinstance(test, dict) or set(test) != fields or not all(
                _number(x) for x in test.values()):
            raise fail(f"comparison '{key}' is not a DeLong test of the requested models")


def _check_survival(model: str, row: Mapping[str, object], v: ValidationSpec,
                    fail: Callable[[str], PrivacyGuardError]) -> None:
    """A Cox model's row (:func:`common.metrics.survival.survival_table`): numbers, the
    per-time values at the protocol's times, the calibration in risk groups of at least
    min_count, the Kaplan-Meier curves on the protocol's grid with no value where fewer than
    min_count are at risk."""
    times, grid = [float(t) for t in v.times], [float(g) for g in v.km_grid]
    for key in ("auc_at", "brier_at"):
        rows = row[key]
        if not isinstance(rows, list) or [r[0] if isinstance(r, list) and len(r) == 2 else None
                                          for r in rows] != times or not all(
                _number(r[1]) for r in rows):
            raise fail(f"model '{model}': '{key}' is not one number at each protocol time")
    calibration = row["calibration_at"]
    if not isinstance(calibration, list) or len(calibration) > len(times) * MAX_RISK_GROUPS:
        raise fail(f"model '{model}': 'calibration_at' is not a list of risk groups per time")
    for r in calibration:
        if (not isinstance(r, list) or len(r) != 5 or r[0] not in times
                or r[1] not in RISK_GROUPS or not all(_number(x) for x in r[2:])):
            raise fail(f"model '{model}': a row of 'calibration_at' is not a time, a risk "
                       "group and three numbers")
        if r[2] < v.min_count:
            raise fail(f"model '{model}': a risk group of {r[2]:g} patients, fewer than "
                       f"min_count = {v.min_count}")
    if row["grid"] != grid:
        raise fail(f"model '{model}': the Kaplan-Meier grid is not the protocol's km_grid")
    curves = row["kaplan_meier"]
    if not isinstance(curves, dict) or not set(curves) <= set(RISK_GROUPS):
        raise fail(f"model '{model}': 'kaplan_meier' is not a curve per risk group")
    for group, curve in curves.items():
        if not isinstance(curve, dict) or set(curve) != {"survival", "at_risk"}:
            raise fail(f"model '{model}': the '{group}' curve is not survival and at_risk")
        survival, at_risk = curve["survival"], curve["at_risk"]
        if (not isinstance(survival, list) or not isinstance(at_risk, list)
                or len(survival) != len(grid) or len(at_risk) != len(grid)
                or not all(_number(x) for x in survival)):
            raise fail(f"model '{model}': the '{group}' curve is not one value per grid time")
        for value, count in zip(survival, at_risk, strict=True):
            if count is None and value == value:
                raise fail(f"model '{model}': the '{group}' curve has a value where fewer "
                           "than min_count are at risk")
            if count is not None and (not _number(count) or count < v.min_count):
                raise fail(f"model '{model}': the '{group}' curve counts {count} at risk, "
                           f"fewer than min_count = {v.min_count}")
    for key in SURVIVAL_KEYS - {"auc_at", "brier_at", "calibration_at", "kaplan_meier", "grid"}:
        if not _number(row[key]):
            raise fail(f"model '{model}': '{key}' is not a number")


def _check_confusion(model: str, row: Mapping[str, object], min_count: int,
                     fail: Callable[[str], PrivacyGuardError]) -> None:
    """No confusion-matrix cell of 1 to min_count - 1 patients; a withheld matrix (a NaN cell)
    takes every metric built from it along (with the test counts, one would give the cells)."""
    small = small_cells(row, min_count)
    if small:
        raise fail(f"model '{model}': confusion-matrix cell '{small[0]}' counts "
                   f"{row[small[0]]:g}, fewer than min_count = {min_count} (and more than 0)")
    if any(row[c] != row[c] for c in CONFUSION_CELLS):
        shown = [k for k in THRESHOLD_METRICS if row[k] == row[k]]
        if shown:
            raise fail(f"model '{model}': '{shown[0]}' is sent with its confusion matrix "
                       "withheld")


def _check_update(update: object, fail: Callable[[str], PrivacyGuardError]) -> None:
    """The site update's summary: a candidate's name (no free text) and each candidate's
    cross-validated deviance, a number or None."""
    names = candidates()
    if not isinstance(update, dict) or set(update) != {"choice", "deviance"}:
        raise fail("'update' must hold 'choice' and 'deviance' only")
    if update["choice"] not in names:
        raise fail(f"'update': the choice is not one of the candidates {names}")
    deviance = update["deviance"]
    if not isinstance(deviance, dict) or not set(deviance) <= set(names) or not all(
            v is None or _number(v) for v in deviance.values()):
        raise fail("'update': 'deviance' is not a number or None per candidate")


def _check_curve(model: str, key: str, rows: object, most: int,
                 fail: Callable[[str], PrivacyGuardError]) -> None:
    if not isinstance(rows, list) or len(rows) > most:
        raise fail(f"model '{model}': '{key}' is not a list of at most {most} rows")
    for row in rows:
        if not isinstance(row, list) or len(row) != 3 or not all(_number(x) for x in row):
            raise fail(f"model '{model}': a row of '{key}' is not three numbers")


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
        if not _number(value):
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
