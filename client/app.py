"""The Flower ClientApp: a site's answers to each phase of the study (``flower-supernode``).

Thin by design: each handler resolves the site once, unpacks the message, calls one function of
:mod:`client.study` and packs the reply with :mod:`common.records`. Phases built so far: 1, the
handshake.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.study import HandshakeReply, handshake, resolve_site
from common.errors import ConfigError
from common.records import to_record


def make_client_app(simulation_cohort: Path | None = None) -> ClientApp:
    """The ClientApp. ``simulation_cohort`` stands in for the run config's
    ``simulation-cohort`` (Flower's in-process simulation passes no run config)."""
    app = ClientApp()

    def site_of(context: Context):  # noqa: ANN202 - a SiteConfig
        run_config = dict(context.run_config)
        if simulation_cohort is not None:
            run_config["simulation-cohort"] = str(simulation_cohort)
        return resolve_site(dict(context.node_config), run_config)

    @app.query("handshake")
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

    return app


app = make_client_app()
