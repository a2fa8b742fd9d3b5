"""The whole study in Flower's simulation engine, on this machine: ``myelofed demo``, the
benchmarks and the simulation tests run it. The ServerApp and ClientApp are those of a real
deployment (:mod:`server.app`, :mod:`client.app`); only the transport differs."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

from flwr.simulation import run_simulation

from client.app import make_client_app
from server.app import make_server_app
from server.study import StudySettings


class _NotRunSimulationDeprecation(logging.Filter):
    """Drops Flower's notice that ``run_simulation`` is deprecated (Flower 1.42 logs it on
    every call; its replacement, ``flwr run`` with a simulation federation, needs an installed
    app and a SuperLink, which the demo and the tests do not have)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("DEPRECATED FEATURE")
                    and "`run_simulation` function is deprecated" in str(record.args))


def run_in_simulation(cohort: Path, settings: StudySettings,
                      progress: Callable[[str], None] | None = None) -> None:
    """The whole study in Flower's simulation engine: one virtual SuperNode per site folder of
    ``cohort`` (each with a manifest.csv), on this machine. ``progress`` gets one line per
    step (default: the ServerApp's own, Flower's log)."""
    n_sites = len(list(cohort.glob("*/manifest.csv")))
    server_app = (make_server_app(settings) if progress is None
                  else make_server_app(settings, progress))
    flower_log = logging.getLogger("flwr")
    quiet = _NotRunSimulationDeprecation()
    flower_log.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            # Ray (Flower's simulation backend) warns on every start that a future release will
            # stop hiding the GPUs from a worker that asked for none; the behaviour we rely on is
            # today's, and the warning is not ours to act on.
            warnings.filterwarnings("ignore", category=FutureWarning,
                                    module=r"ray\._private\.worker",
                                    message="Tip: In future versions of Ray")
            run_simulation(server_app=server_app, client_app=make_client_app(cohort),
                           num_supernodes=n_sites,
                           backend_config={"client_resources": {"num_cpus": 1}})
    finally:
        flower_log.removeFilter(quiet)
