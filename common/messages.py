"""The study's messages: one enum of their types, the study settings every message carries, and
one typed request per phase.

The coordinator (``server/phases``) builds a request; :func:`common.records.pack_request` puts
it into Flower's records and :func:`common.records.unpack_request` reads it back at the site
(``client/app.py``), checked, before any phase code runs. The replies are the payloads of
:mod:`common.payloads`, :mod:`common.selection` and :mod:`harmonization.combat`. No other module
spells a message type: they use :class:`MessageType`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from common.errors import ConfigError
from common.protocol import StudyProtocol, protocol_from_mapping
from common.selection.model import LinearModel
from common.selection.terms import BatchRequest


class MessageType(str, enum.Enum):
    """Every message of a study, as Flower names it (``query.<name>`` for the study's own
    rounds, Flower's ``train`` and ``evaluate`` for the CNN's strategy)."""

    HANDSHAKE = "query.handshake"
    IMAGE_LANDMARKS = "query.image_landmarks"
    PREPARE = "query.prepare"
    COMBAT_DESIGN = "query.combat_design"
    COMBAT_RESIDUALS = "query.combat_residuals"
    COMBAT_MOMENTS = "query.combat_moments"
    COMBAT_APPLY = "query.combat_apply"
    COVBAT_PRODUCTS = "query.covbat_products"
    MODEL_SUMMARY = "query.model_summary"
    MODEL_TERMS = "query.model_terms"
    MODEL_EVALUATE = "query.model_evaluate"
    HARMONY_PRODUCTS = "query.harmony_products"
    HARMONY = "query.harmony"
    TRAIN = "train"
    EVALUATE = "evaluate"

    @property
    def query(self) -> str:
        """The name a ClientApp registers a query handler under (``@app.query(name)``)."""
        if not self.value.startswith("query."):
            raise ValueError(f"{self.value} is not a query")
        return self.value.removeprefix("query.")

    @property
    def is_combat(self) -> bool:
        """ComBat's rounds and CovBat's (whose requests are ComBat's)."""
        return self.name.startswith(("COMBAT_", "COVBAT_"))

    def __str__(self) -> str:
        return self.value


#: ``StudyConfig.phase`` of the segmentation network's train and evaluate messages.
SEGMENTATION = "segmentation"
#: The model an evaluate message of the segmentation phase names (``StudyConfig.models``) when
#: it carries the network trained without the site (``segmentation.leave_site_out``).
SEGMENTATION_LEAVE_SITE_OUT = "segmentation leave-site-out"

#: The record every message carries its study settings in (also Flower's strategies'
#: ``configrecord_key``).
STUDY_RECORD = "study"


@dataclass(frozen=True)
class StudyConfig:
    """The study settings a message carries (sites keep no state between messages): the
    protocol with its hash, and what the phase needs of the run. Read once on receipt
    (:meth:`from_mapping`), typed from there on.

    ``models`` and ``thresholds`` name the models an evaluation scores and their risk
    cut-offs, and ``site_update`` asks the site to score the federated model updated on its
    own rows too (:func:`common.payloads.evaluated_models`); ``radiomics`` is the number of
    radiomics models a nomogram request carries;
    ``server_round`` is set by Flower's strategy in CNN rounds; ``image_standard`` is the
    study's standard landmarks as JSON (:class:`harmonization.images.ImageStandard`), which a
    protocol with histogram standardization prepares with. ``phase`` names the phase a
    ``train`` or ``evaluate`` message is for (:data:`SEGMENTATION`; absent: the CNN's), and
    ``segmenter`` is the segmentation network's model header as JSON
    (:class:`common.segmenter.SegmenterHeader`), which its final evaluation checks masks by.
    ``repeat`` is the split a preparation, ComBat or radiomics message works on, with
    ``validation.repeats`` (absent: the study's first).
    """

    protocol_json: str
    protocol_hash: str
    seed: int | None = None
    test_fraction: float | None = None
    design: str | None = None
    shared_batches: tuple[str, ...] | None = None
    harmonized: bool | None = None
    models: tuple[str, ...] | None = None
    thresholds: tuple[float, ...] | None = None
    radiomics: int | None = None
    threshold: float | None = None
    server_round: int | None = None
    image_standard: str | None = None
    site_update: bool | None = None
    phase: str | None = None
    segmenter: str | None = None
    repeat: int | None = None

    @classmethod
    def of(cls, protocol: StudyProtocol, **settings: Any) -> StudyConfig:
        """The settings of a message of ``protocol``'s study."""
        return cls(json.dumps(protocol.model_dump(mode="json"), sort_keys=True),
                   protocol.content_hash(), **settings)

    def required(self, name: str) -> Any:
        """A setting the phase cannot go without (a :class:`ConfigError` when absent)."""
        value = getattr(self, name)
        if value is None:
            raise ConfigError("study settings of a message", [f"'{name}' is missing"])
        return value

    def split(self, protocol: StudyProtocol) -> int:
        """The split of ``protocol``'s study this message works on (``repeat``; 0, the first,
        when absent); a :class:`ConfigError` for one the study does not have."""
        repeat = self.repeat or 0
        if not 0 <= repeat < protocol.validation.repeats:
            raise ConfigError("study settings of a message", [
                f"'repeat' {repeat} is not one of the study's {protocol.validation.repeats} "
                "split(s)"])
        return repeat

    def protocol(self) -> StudyProtocol:
        """The study protocol, checked against its hash."""
        protocol = protocol_from_mapping(json.loads(self.protocol_json), "study protocol")
        if protocol.content_hash() != self.protocol_hash:
            raise ConfigError("study protocol", ["does not match its hash"])
        return protocol

    def to_mapping(self) -> dict[str, Any]:
        """The settings as Flower's ConfigRecord holds them (absent settings left out; lists
        of models and thresholds as JSON)."""
        out: dict[str, Any] = {"protocol": self.protocol_json,
                               "protocol_hash": self.protocol_hash}
        for item in fields(self)[2:]:
            value = getattr(self, item.name)
            if value is None:
                continue
            key = _KEYS.get(item.name, item.name)
            if item.name in ("models", "thresholds"):
                value = json.dumps(list(value))
            elif item.name == "shared_batches":
                value = list(value)
            out[key] = value
        return out

    @classmethod
    def from_mapping(cls, record: Mapping[str, Any]) -> StudyConfig:
        """The settings of a received message, each typed (a :class:`ConfigError` names the
        setting that is malformed)."""
        try:
            def get(name: str, kind: type) -> Any:
                key = _KEYS.get(name, name)
                return kind(record[key]) if key in record else None

            return cls(
                str(record["protocol"]), str(record["protocol_hash"]),
                seed=get("seed", int), test_fraction=get("test_fraction", float),
                design=get("design", str),
                shared_batches=(tuple(str(b) for b in record["shared_batches"])
                                if "shared_batches" in record else None),
                harmonized=get("harmonized", bool),
                models=(tuple(str(m) for m in json.loads(str(record["models"])))
                        if "models" in record else None),
                thresholds=(tuple(float(t) for t in json.loads(str(record["thresholds"])))
                            if "thresholds" in record else None),
                radiomics=get("radiomics", int), threshold=get("threshold", float),
                server_round=get("server_round", int),
                image_standard=get("image_standard", str),
                site_update=get("site_update", bool), phase=get("phase", str),
                segmenter=get("segmenter", str), repeat=get("repeat", int))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError("study settings of a message", [f"malformed: {exc!r}"]) from None


#: Settings whose key in the record differs from the field's name (Flower's own).
_KEYS = {"server_round": "server-round"}


@dataclass(frozen=True)
class StudyRequest:
    """A request that carries only the study settings (the handshake, the preparation, the
    radiomics model's first round, ComBat's first round)."""

    study: StudyConfig


@dataclass(frozen=True)
class ModelTermsRequest:
    """A batch of model fits to step (:class:`common.selection.terms.BatchRequest`); for the
    nomogram, one radiomics model per training set, whose score is its first term."""

    study: StudyConfig
    request: BatchRequest
    radiomics: tuple[LinearModel, ...] = ()


@dataclass(frozen=True)
class EvaluateRequest:
    """The models a site scores on its test rows (named in ``study.models``, with their risk
    cut-offs in ``study.thresholds``); a nomogram comes with the radiomics model whose score it
    takes (``radiomics``: as many as there are nomograms, in the same order)."""

    study: StudyConfig
    model: tuple[LinearModel, ...]
    radiomics: tuple[LinearModel, ...] = ()

    def named(self) -> tuple[dict[str, LinearModel], dict[str, LinearModel]]:
        """The models by name, and the radiomics model of each nomogram by its name."""
        names = self.study.models or ()
        if len(names) != len(self.model):
            raise ConfigError("evaluation request", [
                f"{len(names)} model names for {len(self.model)} models"])
        # a nomogram request carries one radiomics model per model; others none
        return (dict(zip(names, self.model, strict=True)),
                dict(zip(names, self.radiomics, strict=False)))
