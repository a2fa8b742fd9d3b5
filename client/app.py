"""The Flower ClientApp: a site's answers to each phase of the study (``flower-supernode``).

Thin by design: each handler resolves the site once, unpacks the message, calls one function of
:mod:`client.study` and packs the reply with :mod:`common.records`. Phases built so far: 1, the
handshake; 2, local preparation; 3, federated ComBat; 4, the radiomics model; 5, the CNN
(Flower's train and evaluate messages).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.guard import PrivacyGuardError, check_reply
from client.study import (
    HandshakeReply,
    PrepareReply,
    combat_inputs,
    combat_model_at_site,
    evaluate_models,
    feature_width,
    handshake,
    harmonize_site,
    model_summary,
    model_terms,
    prepare,
    resolve_site,
)
from common.errors import ConfigError, MyeloFedError
from common.selection import BatchRequest, LinearModel
from common.protocol import StudyProtocol, protocol_from_mapping
from common.records import pack, to_record, unpack
from harmonization.combat import (
    LocationFit,
    PooledVariance,
    StackedAdjustments,
    StackedMoments,
    design_from_json,
    site_batch_moments,
    site_design_moments,
    site_residual_moments,
    standardize,
)


def _protocol(msg: Message) -> StudyProtocol:
    """The study protocol a phase message carries, checked against its hash."""
    study = msg.content["study"]
    protocol = protocol_from_mapping(json.loads(str(study["protocol"])), "study protocol")
    if protocol.content_hash() != str(study["protocol_hash"]):
        raise ConfigError("study protocol", ["does not match its hash"])
    return protocol


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
    if msg.metadata.message_type != "train" or reply.has_error():
        return reply
    try:
        spec = _protocol(msg).cnn
        if spec is None or spec.local_dp is None:
            return reply
        from flwr.app import Array, ArrayRecord
        from flwr.supercore.differential_privacy import (
            add_gaussian_noise_inplace,
            compute_clip_model_update,
        )

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
                  features: Callable[[Context, StudyProtocol], int | None]) -> Mod:
    """A Flower mod: the site's privacy guard (:mod:`client.guard`) on every reply. A reply
    that breaks its schema, or one the guard cannot check, is withheld: the coordinator gets an
    error naming the rule and the site's log says what was withheld. ``features`` gives the
    width of the site's feature table (None before the preparation)."""
    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
            ) -> Message:
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        kind = msg.metadata.message_type
        protocol = functools.cache(lambda: _protocol(msg))  # read once, only where needed
        try:
            check_reply(kind, msg.content, reply.content, protocol,
                        lambda: features(context, protocol()), site_name(context))
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


def make_client_app(simulation_cohort: Path | None = None, mods: Sequence[Mod] = ()
                    ) -> ClientApp:
    """The ClientApp. ``simulation_cohort`` stands in for the run config's
    ``simulation-cohort`` (Flower's in-process simulation passes no run config); ``mods`` are
    Flower mods around every handler (e.g. one that inspects every outgoing reply); the
    protocol's local differential privacy (:func:`local_dp`) is the innermost, inside the
    site's privacy guard (:mod:`client.guard`), which checks every reply that leaves."""
    def site_of(context: Context):  # noqa: ANN202 - a SiteConfig
        run_config = dict(context.run_config)
        if simulation_cohort is not None:
            run_config["simulation-cohort"] = str(simulation_cohort)
        return resolve_site(dict(context.node_config), run_config)

    def site_name(context: Context) -> str:
        try:
            return site_of(context).site_name
        except MyeloFedError:
            return str(context.node_config.get("site-name", "this site"))

    guard = privacy_guard(site_name,
                          lambda context, protocol: feature_width(site_of(context), protocol))
    app = ClientApp(mods=[*mods, guard, local_dp])

    @app.query("handshake")
    @guarded
    def _handshake(msg: Message, context: Context) -> Message:
        study = msg.content["study"]
        expected = str(study["protocol_hash"])
        try:
            site = site_of(context)
        except ConfigError as exc:
            name = str(context.node_config.get("site-name", "unknown site"))
            reply = HandshakeReply(name, "refused", expected, "site_config_invalid",
                                   exc.problems[0][:200] if exc.problems else "")
        else:
            reply = handshake(site, str(study["protocol"]), expected)
        return Message(to_record(reply), reply_to=msg)

    @app.query("prepare")
    @guarded
    def _prepare(msg: Message, context: Context) -> Message:
        site = site_of(context)
        study = msg.content["study"]
        try:
            reply = prepare(site, _protocol(msg), int(study["seed"]),
                            float(study["test_fraction"]))
        except MyeloFedError as exc:
            reply = PrepareReply(site.site_name, "refused", type(exc).__name__,
                                 str(exc).splitlines()[0][:200])
        return Message(to_record(reply), reply_to=msg)

    def combat_context(msg: Message, context: Context):  # noqa: ANN202
        site, protocol = site_of(context), _protocol(msg)
        design, options = design_from_json(str(msg.content["study"]["design"]))
        return site, protocol, design, options

    def pooled_estimates(msg: Message):  # noqa: ANN202 - (LocationFit, pooled variance)
        fit = unpack(msg.content, "fit", LocationFit, sender="the server")
        return fit, unpack(msg.content, "var", PooledVariance, sender="the server").var

    @app.query("combat_design")
    @guarded
    def _combat_design(msg: Message, context: Context) -> Message:
        site, protocol, design, options = combat_context(msg, context)
        y, batch, covariates, _ = combat_inputs(site, protocol)
        moments = site_design_moments(y, batch, covariates, design, options, site.site_name)
        return Message(pack(moments=moments), reply_to=msg)

    @app.query("combat_residuals")
    @guarded
    def _combat_residuals(msg: Message, context: Context) -> Message:
        site, protocol, design, _ = combat_context(msg, context)
        y, batch, covariates, _ = combat_inputs(site, protocol)
        fit = unpack(msg.content, "fit", LocationFit, sender="the server")
        residuals = site_residual_moments(y, batch, covariates, design, fit)
        return Message(pack(residuals=residuals), reply_to=msg)

    @app.query("combat_moments")
    @guarded
    def _combat_moments(msg: Message, context: Context) -> Message:
        """Only for batches this site shares with another: their moments."""
        site, protocol, design, _ = combat_context(msg, context)
        y, batch, covariates, _ = combat_inputs(site, protocol)
        fit, var = pooled_estimates(msg)
        shared = set(msg.content["study"]["shared_batches"])
        z = standardize(y, batch, covariates, design, fit, var)
        mine = [m for name, m in sorted(site_batch_moments(z, batch, design).items())
                if name in shared]
        return Message(pack(moments=StackedMoments.of(mine, y.shape[1])), reply_to=msg)

    @app.query("combat_apply")
    @guarded
    def _combat_apply(msg: Message, context: Context) -> Message:
        site, protocol, design, options = combat_context(msg, context)
        fit, var = pooled_estimates(msg)
        shared = unpack(msg.content, "shared", StackedAdjustments, sender="the server")
        model = combat_model_at_site(site, protocol, design, options, fit, var,
                                     shared.unstack())
        rows = harmonize_site(site, protocol, model)
        return Message(RecordDict({"result": ConfigRecord({"rows": rows})}), reply_to=msg)

    def model_context(msg: Message, context: Context):  # noqa: ANN202
        return site_of(context), _protocol(msg), bool(msg.content["study"]["harmonized"])

    @app.query("model_summary")
    @guarded
    def _model_summary(msg: Message, context: Context) -> Message:
        site, protocol, harmonized = model_context(msg, context)
        moments, local = model_summary(site, protocol, harmonized)
        payloads = {"moments": moments} | ({"local": local} if local is not None else {})
        return Message(pack(**payloads), reply_to=msg)

    @app.query("model_terms")
    @guarded
    def _model_terms(msg: Message, context: Context) -> Message:
        site, protocol, harmonized = model_context(msg, context)
        request = unpack(msg.content, "request", BatchRequest, sender="the server")
        radiomics = None
        if "radiomics" in msg.content["study"]:  # the nomogram: one radiomics model a set
            radiomics = [unpack(msg.content, f"radiomics{t}", LinearModel, sender="the server")
                         for t in range(int(msg.content["study"]["radiomics"]))]
        return Message(pack(terms=model_terms(site, protocol, harmonized, request, radiomics)),
                       reply_to=msg)

    @app.query("model_evaluate")
    @guarded
    def _model_evaluate(msg: Message, context: Context) -> Message:
        site, protocol, harmonized = model_context(msg, context)
        names = json.loads(str(msg.content["study"]["models"]))
        models = {name: unpack(msg.content, f"model{i}", LinearModel, sender="the server")
                  for i, name in enumerate(names)}
        radiomics = {name: unpack(msg.content, f"radiomics{i}", LinearModel,
                                  sender="the server")
                     for i, name in enumerate(names) if f"radiomics{i}.meta" in msg.content}
        study = msg.content["study"]
        thresholds = (dict(zip(names, json.loads(str(study["thresholds"]))))
                      if "thresholds" in study else None)
        return Message(pack(metrics=evaluate_models(
            site, protocol, harmonized, models, radiomics, thresholds,
            int(study["seed"]) if "seed" in study else 0)), reply_to=msg)

    # --- phase 5: the CNN, through Flower's strategies (train and evaluate messages) ---------

    def cnn_reply(msg: Message, site_name: str, protocol: StudyProtocol,
                  metrics: dict[str, float], arrays: dict | None = None) -> Message:
        """A train or evaluate reply: the metrics, the weights, and the site's name with the
        hash of the protocol it worked under (the server refuses an update under another)."""
        from flwr.app import Array, ArrayRecord, MetricRecord

        content = RecordDict({"metrics": MetricRecord(metrics),
                              "site": ConfigRecord({"name": site_name,
                                                    "protocol_hash": protocol.content_hash()})})
        if arrays is not None:
            content["arrays"] = ArrayRecord({k: Array(np.require(v, requirements="C"))
                                             for k, v in arrays.items()})
        return Message(content, reply_to=msg)

    def global_weights(msg: Message) -> dict:
        return {k: v.numpy() for k, v in msg.content["arrays"].items()}

    @app.train()
    @guarded
    def _train(msg: Message, context: Context) -> Message:
        """Evaluate the global weights received on the test crops (one message a round: the
        metrics of round r - 1's model come back with round r's training), then train them."""
        from client.cnn import evaluate_arrays, train_round

        site, protocol = site_of(context), _protocol(msg)
        study = msg.content["study"]
        weights = global_weights(msg)
        before = evaluate_arrays(site, protocol, weights, include_train=False)
        result = train_round(site, protocol, weights, round_index=int(study["server-round"]),
                             seed=int(study["seed"]))
        metrics = {"num-examples": result.n_examples, "train_loss": result.loss,
                   "train_seconds": result.seconds,
                   **{f"global_{k}": v for k, v in before.as_record().items()}}
        return cnn_reply(msg, site.site_name, protocol, metrics, result.weights)

    @app.evaluate()
    @guarded
    def _evaluate(msg: Message, context: Context) -> Message:
        from client.cnn import evaluate_arrays

        from client.report import record_cnn

        site, protocol = site_of(context), _protocol(msg)
        weights = global_weights(msg)
        result = evaluate_arrays(site, protocol, weights)
        study = msg.content["study"]
        interval = record_cnn(site, protocol, weights,
                              float(study["threshold"]) if "threshold" in study else 0.5,
                              int(study["seed"]) if "seed" in study else 0)
        return cnn_reply(msg, site.site_name, protocol,
                         {"num-examples": result.test.n, **result.as_record(), **interval})

    return app


app = make_client_app()
