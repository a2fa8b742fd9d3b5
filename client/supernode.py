"""A site's SuperNode that runs only the study apps the site approved.

With ``flwr run`` the coordinator ships the app (the ClientApp's code) to every site, and each
SuperNode runs whatever arrives. Flower 1.42 can verify signed apps (``--trusted-entities``),
but only with a SuperLink that vouches for them, which the free edition does not. So the site
keeps its own allow-list: ``approved_apps`` in its site config, the SHA-256 of each approved
app bundle (FAB) as ``myelofed app-hash`` prints it (:mod:`common.bundle`: Flower builds a FAB
reproducibly, same files, same hash).

This module runs Flower's own ``flower-supernode`` in this process, with one step added where
the SuperNode fetches the app of a run it has not seen yet: the bundle's SHA-256 must be
approved, or the run is refused there, before a ClientApp is started, so no code of the app runs
and no data is touched. The refusal is logged with the hash and answered to the coordinator as
an error reply (Flower's "invalid FAB" error code, with the site's reason), so the study names
the site and why. Every later message of that run is refused the same way.

The hook is on a private function of ``flwr.supernode.start_client_internal`` (Flower 1.42.x,
pinned in pyproject.toml); :func:`install` fails loudly when it is not where it was.

Approving a new release needs no restart: with ``--site-config``, SIGHUP (``systemctl reload``)
reads the site config's ``approved_apps`` again; a config that no longer loads leaves the
approvals as they were, saying why. On its way out the SuperNode stops the ClientApp processes
it started, so none outlives the site.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import inspect
import signal
import sys
from collections.abc import Callable, Sequence
from logging import ERROR, INFO
from pathlib import Path
from typing import Any, Final

import psutil
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.supercore import log
from flwr.supernode import start_client_internal as flower
from flwr.supernode.cli.flower_supernode import flower_supernode

from common.bundle import is_app_hash
from common.errors import ConfigError
from common.site_config import load_site_config

#: The private function the hook wraps, and the parameters it must still have.
_TARGET: Final = "_pull_and_store_message"
_PARAMETERS: Final = ("state", "object_store", "receive", "get_fab")


class AppRefused(Exception):
    """The app of a run is not in the site's allow-list."""

    def __init__(self, digest: str, run_id: int) -> None:
        super().__init__(digest, run_id)
        self.digest, self.run_id = digest, run_id


class Approvals:
    """The apps this site approved, read again from its site config on SIGHUP."""

    def __init__(self, approved: frozenset[str], site_config: Path | None = None) -> None:
        self.current, self.site_config = approved, site_config

    def __contains__(self, digest: object) -> bool:
        return digest in self.current

    def reload(self) -> None:
        if self.site_config is None:
            log(ERROR, "MyeloFed: no --site-config: approvals not reloaded")
            return
        try:
            approved = frozenset(load_site_config(self.site_config).approved_apps)
        except ConfigError as exc:
            log(ERROR, "MyeloFed: approvals not reloaded, %s", str(exc).replace("\n", "; "))
            return
        if not approved:
            log(ERROR, "MyeloFed: approvals not reloaded: approved_apps is empty in %s",
                self.site_config)
            return
        self.current = approved
        log(INFO, "MyeloFed: approvals reloaded from %s: %s", self.site_config,
            ", ".join(sorted(a[:12] for a in approved)))


def guard(original: Callable[..., int | None], approved: Approvals | frozenset[str], site: str
          ) -> Callable[..., int | None]:
    """``original`` (Flower's pull-and-store step) with the app of every new run checked
    against ``approved``; a refused run gets an error reply instead of a ClientApp."""

    def pull_and_store(**kwargs: Any) -> int | None:
        received: list[Any] = []
        receive, get_fab = kwargs["receive"], kwargs["get_fab"]

        def receiving() -> Any:
            got = receive()
            if got is not None:
                received.append(got[0])
            return got

        def checked_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            digest = hashlib.sha256(fab.content).hexdigest()
            if digest not in approved:
                raise AppRefused(digest, run_id)
            return fab

        try:
            return original(**(kwargs | {"receive": receiving, "get_fab": checked_fab}))
        except AppRefused as refused:
            reason = (f"site {site} refuses run {refused.run_id}: its app {refused.digest} is "
                      "not in the site's approved_apps")
            log(ERROR, "MyeloFed: %s (nothing of it was run)", reason)
            reply = Message(Error(ErrorCode.INVALID_FAB, reason), reply_to=received[-1])
            flower._insert_message(reply, kwargs["state"], kwargs["object_store"])
            return refused.run_id

    return pull_and_store


def install(approved: Approvals | frozenset[str], site: str) -> None:
    """Put the check into Flower's SuperNode (this process)."""
    original = getattr(flower, _TARGET, None)
    if original is None or not set(_PARAMETERS) <= set(inspect.signature(original).parameters):
        raise RuntimeError(f"flwr.supernode.start_client_internal.{_TARGET} is not the one this "
                           "site guard was written for (Flower 1.42): the app allow-list "
                           "cannot be enforced, so the SuperNode does not start")
    if not hasattr(flower, "_insert_message"):
        raise RuntimeError("flwr.supernode.start_client_internal._insert_message is missing")
    setattr(flower, _TARGET, guard(original, approved, site))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m client.supernode --site NAME (--approve HASH ... | --allow-any-app) --
    <flower-supernode arguments>``."""
    parser = argparse.ArgumentParser(prog="python -m client.supernode",
                                     description="flower-supernode with the site's app "
                                     "allow-list")
    parser.add_argument("--site", required=True)
    parser.add_argument("--approve", action="append", default=[], metavar="SHA256")
    parser.add_argument("--allow-any-app", action="store_true")
    parser.add_argument("--site-config", type=Path, default=None,
                        help="re-read its approved_apps on SIGHUP")
    parser.add_argument("supernode_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = args.supernode_args[1:] if args.supernode_args[:1] == ["--"] else args.supernode_args
    bad = [h for h in args.approve if not is_app_hash(h)]
    if bad:
        parser.error(f"--approve {bad[0]}: not a SHA-256 in lower-case hex")
    if not args.approve and not args.allow_any_app:
        parser.error("no approved app: give --approve (see 'myelofed app-hash') or "
                     "--allow-any-app")
    if not args.allow_any_app:
        approvals = Approvals(frozenset(args.approve), args.site_config)
        install(approvals, args.site)
        signal.signal(signal.SIGHUP, lambda signum, frame: approvals.reload())
    atexit.register(_stop_children)
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


def _stop_children(grace_s: float = 10.0) -> None:
    """SIGTERM the processes this SuperNode started (ClientApps), SIGKILL what is left."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


if __name__ == "__main__":
    main()
