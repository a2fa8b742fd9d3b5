"""The Flower ClientApp: a site's answers to each phase of the study (``flower-supernode``).

Thin by design: one handler per message type (:class:`common.messages.MessageType`); each
resolves the site, reads the typed request (:func:`common.records.unpack_request`), calls one
function of the phase's module in :mod:`client.phases` and packs the reply. Around every
handler: the site's privacy guard (:mod:`client.guard`) and, innermost, the protocol's local
differential privacy on CNN updates.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.supercore.differential_privacy import (
    add_gaussian_noise_inplace,
    compute_clip_model_update,
)

from client.guard import PrivacyGuardError, check_reply
from client.phases import handshake
from client.workspace import feature_width, resolve_site
from common.errors import ConfigError, MyeloFedError
from common.messages import (
    SEGMENTATION,
    STUDY_RECORD,
    EvaluateRequest,
    MessageType,
    ModelTermsRequest,
    StudyConfig,
    StudyRequest,
)
from common.payloads import MIN_ROWS_SENT
from common.protocol import StudyProtocol
from common.records import pack, to_record, unpack_request
from common.site_config import SiteConfig
from common.wire import to_wire
from harmonization.federated_harmony import REPLY_NAMES
from harmonization.images import ImageStandard
from harmonization.messages import CombatRequest, EmbeddingHarmonyRequest


def study_of(msg: Message) -> StudyConfig:
    """The study settings a phase message carries, typed."""
    return StudyConfig.from_mapping(dict(msg.content[STUDY_RECORD]))


def _protocol(msg: Message) -> StudyProtocol:
    """The study protocol a phase message carries, checked against its hash."""
    return study_of(msg).protocol()


#: Error codes of a site's replies (Flower's own codes are below 100): a refusal (bad input,
#: guard, configuration) and an unexpected failure (a bug; the traceback stays in the site's log).
SITE_REFUSED = 400
SITE_FAILED = 500
log = logging.getLogger("myelofed.site")


def refusal(exc: MyeloFedError) -> str:
    """What a refusal says: the error type and its reason, without file paths (a
    ConfigError's source is a path at this site: only its problems are sent)."""
    if isinstance(exc, ConfigError):
        text = "; ".join(exc.problems)
    else:
        text = str(exc).splitlines()[0]
    return f"{type(exc).__name__}: {text}"[:300]


def guarded(handler: Callable[[Message, Context], Message]
            ) -> Callable[[Message, Context], Message]:
    """A handler whose failures reply with a code and a short reason, never a traceback."""
    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except MyeloFedError as exc:
            return Message(error=Error(SITE_REFUSED, refusal(exc)), reply_to=msg)
        except Exception as exc:  # noqa: BLE001 - a bug: no traceback or path leaves the site
            log.exception("%s failed", msg.metadata.message_type)
            return Message(error=Error(SITE_FAILED, f"internal error ({type(exc).__name__}); "
                                                    "see the site's log"), reply_to=msg)
    return wrapper


def local_dp(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
             ) -> Message:
    """A Flower mod: when the protocol asks for local differential privacy (``cnn.local_dp``),
    a train reply's float weights leave clipped and noised (Flower's own clipping and Gaussian
    noise, :mod:`flwr.supercore.differential_privacy`), and the reply says with which epsilon
    and delta. Other messages, and integer weights (BatchNorm's counters), pass unchanged. If
    the noise cannot be added, the reply is an error: an update never leaves un-noised."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    try:
        spec = _protocol(msg).cnn
        if spec is None or spec.local_dp is None:
            return reply
        dp = spec.local_dp
        sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        trained = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        floats = [k for k, v in trained.items() if v.dtype.kind == "f"]
        update = [trained[k].astype(np.float64) for k in floats]
        compute_clip_model_update(update, [sent[k].astype(np.float64) for k in floats],
                                  dp.clipping_norm)
        add_gaussian_noise_inplace(update, dp.noise_std)
        for k, v in zip(floats, update, strict=True):
            trained[k] = v.astype(trained[k].dtype)
        reply.content["arrays"] = ArrayRecord({k: Array(np.require(v, requirements="C"))
                                               for k, v in trained.items()})
        metrics = reply.content["metrics"]
        metrics["dp_epsilon"], metrics["dp_delta"] = dp.epsilon, dp.delta
        metrics["dp_noise_std"] = dp.noise_std
        return reply
    except Exception as exc:  # noqa: BLE001 - never send the update without its noise
        log.exception("local differential privacy failed")
        return Message(error=Error(SITE_FAILED, f"local DP failed ({type(exc).__name__}): the "
                                                "update was not sent"), reply_to=msg)


def privacy_guard(site_name: Callable[[Context], str],
                  features: Callable[[Context, StudyProtocol], int | None],
                  floor: Callable[[Context], int] = lambda _: MIN_ROWS_SENT) -> Mod:
    """A Flower mod: the site's privacy guard (:mod:`client.guard`) on every reply. A reply
    that breaks its schema, or one the guard cannot check, is withheld: the coordinator gets an
    error naming the rule and the site's log says what was withheld. ``features`` gives the
    width of the site's feature table (None before the preparation), ``floor`` the site's
    ``min_patients``."""
    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
            ) -> Message:
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        kind = msg.metadata.message_type
        protocol = functools.cache(lambda: _protocol(msg))  # read once, only where needed
        try:
            check_reply(kind, msg.content, reply.content, protocol,
                        lambda: features(context, protocol()), site_name(context),
                        floor(context))
            return reply
        except PrivacyGuardError as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - fail closed: an unchecked reply stays here
            log.exception("the privacy guard could not check a reply to %s", kind)
            reason = f"the guard could not check it ({type(exc).__name__})"
        log.error("MyeloFed privacy guard: the reply to %s is withheld: %s", kind, reason)
        return Message(error=Error(SITE_REFUSED, f"PrivacyGuardError: reply withheld: "
                                                 f"{reason}"[:300]), reply_to=msg)
    return mod


def make_client_app(simulation_cohort: Path | None = None, mods: Sequence[Mod] = (),
                    min_patients: int | None = None) -> ClientApp:
    """The ClientApp. ``simulation_cohort`` stands in for the run config's
    ``simulation-cohort`` (Flower's in-process simulation passes no run config), and
    ``min_patients`` for its ``simulation-min-patients`` (the virtual sites' floor); ``mods`` are
    Flower mods around every handler (e.g. one that inspects every outgoing reply); the
    protocol's local differential privacy (:func:`local_dp`) is the innermost, inside the
    site's privacy guard (:mod:`client.guard`), which checks every reply that leaves."""
    def site_of(context: Context) -> SiteConfig:
        run_config = dict(context.run_config)
        if simulation_cohort is not None:
            run_config["simulation-cohort"] = str(simulation_cohort)
        if min_patients is not None:
            run_config["simulation-min-patients"] = min_patients
        return resolve_site(dict(context.node_config), run_config)

    def site_name(context: Context) -> str:
        try:
            return site_of(context).site_name
        except MyeloFedError:
            return str(context.node_config.get("site-name", "this site"))

    def floor(context: Context) -> int:
        try:
            return site_of(context).min_patients
        except MyeloFedError:  # no site: the default floor (the handler refuses anyway)
            return MIN_ROWS_SENT

    guard = privacy_guard(site_name,
                          lambda context, protocol: feature_width(site_of(context), protocol),
                          floor)
    app = ClientApp(mods=[*mods, guard, local_dp])

    def reply(msg: Message, **payloads: object) -> Message:
        return Message(pack(**payloads), reply_to=msg)

    @app.query(MessageType.HANDSHAKE.query)
    @guarded
    def _handshake(msg: Message, context: Context) -> Message:
        study = unpack_request(msg.content, StudyRequest).study
        try:
            site = site_of(context)
        except ConfigError as exc:
            name = str(context.node_config.get("site-name", "unknown site"))
            answer = handshake.refused(name, study.protocol_hash, exc)
        else:
            answer = handshake.handshake(site, study.protocol_json, study.protocol_hash)
        return Message(to_record(answer), reply_to=msg)

    @app.query(MessageType.IMAGE_LANDMARKS.query)
    @guarded
    def _image_landmarks(msg: Message, context: Context) -> Message:
        from client.phases import images  # see _prepare

        study = unpack_request(msg.content, StudyRequest).study
        return reply(msg, sums=images.image_landmarks(
            site_of(context), study.protocol(), study.required("seed"),
            study.required("test_fraction")))

    @app.query(MessageType.PREPARE.query)
    @guarded
    def _prepare(msg: Message, context: Context) -> Message:
        # Each message starts a fresh ClientApp process: a phase's module, and the libraries it
        # needs (pandas for the tables; pyradiomics and SimpleITK for the preparation;
        # matplotlib for the site report; torch and MONAI for the CNN), load only in the
        # processes that run that phase, which keeps every round's start quick.
        from client.phases import prepare

        site = site_of(context)
        study = unpack_request(msg.content, StudyRequest).study
        try:
            standard = (None if study.image_standard is None else
                        ImageStandard.from_json(study.image_standard))
            protocol = study.protocol()
            answer = prepare.prepare(site, protocol, study.required("seed"),
                                     study.required("test_fraction"), standard,
                                     study.split(protocol))
        except MyeloFedError as exc:
            answer = prepare.refused(site.site_name, exc)
        return Message(to_record(answer), reply_to=msg)

    def combat_request(msg: Message, context: Context
                       ) -> tuple[SiteConfig, StudyProtocol, CombatRequest]:
        """The site, its protocol and a ComBat round's request."""
        request = unpack_request(msg.content, CombatRequest)
        return site_of(context), request.study.protocol(), request

    @app.query(MessageType.COMBAT_DESIGN.query)
    @guarded
    def _combat_design(msg: Message, context: Context) -> Message:
        from client.phases import combat  # see _prepare

        return reply(msg, moments=combat.design_moments(*combat_request(msg, context)))

    @app.query(MessageType.COMBAT_RESIDUALS.query)
    @guarded
    def _combat_residuals(msg: Message, context: Context) -> Message:
        from client.phases import combat  # see _prepare

        return reply(msg, residuals=combat.residual_moments(*combat_request(msg, context)))

    @app.query(MessageType.COMBAT_MOMENTS.query)
    @guarded
    def _combat_moments(msg: Message, context: Context) -> Message:
        from client.phases import combat  # see _prepare

        return reply(msg, moments=combat.shared_moments(*combat_request(msg, context)))

    @app.query(MessageType.COVBAT_PRODUCTS.query)
    @guarded
    def _covbat_products(msg: Message, context: Context) -> Message:
        from client.phases import combat  # see _prepare

        return reply(msg, products=combat.residual_products(*combat_request(msg, context)))

    @app.query(MessageType.COMBAT_APPLY.query)
    @guarded
    def _combat_apply(msg: Message, context: Context) -> Message:
        from client.phases import combat  # see _prepare

        return reply(msg, result=combat.apply(*combat_request(msg, context)))

    @app.query(MessageType.HARMONY_PRODUCTS.query)
    @guarded
    def _harmony_products(msg: Message, context: Context) -> Message:
        from client.phases import harmony  # see _prepare

        study = unpack_request(msg.content, EmbeddingHarmonyRequest).study
        return reply(msg, products=harmony.embedding_products(site_of(context),
                                                              study.protocol()))

    @app.query(MessageType.HARMONY.query)
    @guarded
    def _harmony(msg: Message, context: Context) -> Message:
        from client.phases import harmony  # see _prepare

        request = unpack_request(msg.content, EmbeddingHarmonyRequest)
        answer = harmony.harmony_round(site_of(context), request.study.protocol(),
                                       request.study.required("seed"), request)
        return reply(msg, **{REPLY_NAMES[type(answer)]: answer})

    @app.query(MessageType.MODEL_SUMMARY.query)
    @guarded
    def _model_summary(msg: Message, context: Context) -> Message:
        from client.phases import radiomics  # see _prepare

        study = unpack_request(msg.content, StudyRequest).study
        protocol = study.protocol()
        moments, local = radiomics.model_summary(site_of(context), protocol,
                                                 bool(study.required("harmonized")),
                                                 study.split(protocol))
        return reply(msg, moments=moments, **({"local": local} if local is not None else {}))

    @app.query(MessageType.MODEL_TERMS.query)
    @guarded
    def _model_terms(msg: Message, context: Context) -> Message:
        from client.phases import radiomics  # see _prepare

        request = unpack_request(msg.content, ModelTermsRequest)
        return reply(msg, terms=radiomics.model_terms(site_of(context), request.study.protocol(),
                                                      request))

    @app.query(MessageType.MODEL_EVALUATE.query)
    @guarded
    def _model_evaluate(msg: Message, context: Context) -> Message:
        from client.phases import validation  # the site report: see _prepare

        request = unpack_request(msg.content, EvaluateRequest)
        return reply(msg, metrics=validation.evaluate_request(
            site_of(context), request.study.protocol(), request))

    # --- the CNN, through Flower's strategies (train and evaluate messages) -----------------

    def cnn_reply(msg: Message, site_name: str, protocol: StudyProtocol,
                  metrics: dict[str, float], arrays: dict[str, np.ndarray] | None = None
                  ) -> Message:
        """A train or evaluate reply: the metrics, the weights, and the site's name with the
        hash of the protocol it worked under (the server refuses an update under another)."""
        content = RecordDict({"metrics": MetricRecord(metrics),
                              "site": ConfigRecord({"name": site_name,
                                                    "protocol_hash": protocol.content_hash()})})
        if arrays is not None:
            content["arrays"] = ArrayRecord({k: Array(np.require(v, requirements="C"))
                                             for k, v in arrays.items()})
        return Message(content, reply_to=msg)

    def global_weights(msg: Message) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in msg.content["arrays"].items()}

    @app.train()
    @guarded
    def _train(msg: Message, context: Context) -> Message:
        from client.phases import cnn  # torch and MONAI: see _prepare

        site, study = site_of(context), study_of(msg)
        protocol = study.protocol()
        if study.phase == SEGMENTATION:
            from client.phases import segmentation  # torch and MONAI: see _prepare

            metrics, weights = segmentation.train(site, protocol, study, global_weights(msg))
            return cnn_reply(msg, site.site_name, protocol, metrics, weights)
        metrics, result = cnn.train(site, protocol, study, global_weights(msg))
        assert protocol.cnn is not None  # cnn.train refuses a protocol without a CNN
        return cnn_reply(msg, site.site_name, protocol, metrics,
                         to_wire(result.weights, protocol.cnn.transfer))

    @app.evaluate()
    @guarded
    def _evaluate(msg: Message, context: Context) -> Message:
        from client.phases import cnn  # torch and MONAI: see _prepare

        site, study = site_of(context), study_of(msg)
        protocol = study.protocol()
        if study.phase == SEGMENTATION:
            from client.phases import segmentation  # torch and MONAI: see _prepare

            return cnn_reply(msg, site.site_name, protocol, segmentation.evaluate(
                site, protocol, study, global_weights(msg)))
        metrics = cnn.evaluate(site, protocol, study, global_weights(msg))
        return cnn_reply(msg, site.site_name, protocol, metrics)

    return app


app = make_client_app()
