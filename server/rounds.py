"""The server's round mechanics, the same for every phase: send one message to each site, collect
the replies by site name, name every site that failed and why. Written over a small
:class:`Transport` (Flower's ``Grid`` in :mod:`server.app`; a fake in the tests), so the phases
run without Flower.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from common.messages import MessageType, StudyConfig
from common.records import PayloadError, from_record, unpack
from server.study import StudySettings

#: Flower's ``RecordDict`` (only the app modules and the record packing import Flower).
Records = Any


@dataclass(frozen=True)
class Reply:
    """A node's answer to one message: its content, or Flower's error (``"error CODE: REASON"``).
    """

    node: int
    content: Records = None
    error: str = ""

    def has_error(self) -> bool:
        return bool(self.error)


class Transport(Protocol):
    """How the server reaches the sites: the connected nodes, and one round of messages."""

    def node_ids(self) -> list[int]:
        """The SuperNodes connected now."""
        ...

    def send_and_receive(self, message_type: MessageType, contents: Mapping[int, Records],
                         timeout_s: float) -> Iterable[Reply]:
        """One message of ``message_type`` to each node (``contents``: node -> records); the
        replies that arrived within ``timeout_s`` (Flower answers for a node that went silent
        with an error reply of its own)."""
        ...

    def train_rounds(self, strategy: Any, start: Mapping[str, np.ndarray], rounds: int,
                     timeout_s: float, study: StudyConfig) -> dict[str, np.ndarray]:
        """``rounds`` rounds of the CNN's Flower strategy (:mod:`server.strategy`) from the
        global weights ``start``; the final global weights."""
        ...


#: How long the handshake waits, once ``min_sites`` sites are connected, for the other
#: registered sites. A SuperNode that has just reconnected (after a coordinator's restart) is
#: online to the SuperLink only with its next heartbeat, some seconds later.
JOIN_GRACE_S = 60.0


def wait_for_nodes(transport: Transport, count: int, timeout_s: float,
                   expected: Iterable[int] = (), grace_s: float = JOIN_GRACE_S) -> list[int]:
    """The connected SuperNodes: at once when every ``expected`` node (the registered sites) and
    at least ``count`` are there; else once ``count`` are there and ``grace_s`` has passed since
    (or when ``timeout_s`` is up)."""
    expected = set(expected)
    now = time.monotonic()
    deadline, enough_since = now + timeout_s, None
    while True:
        nodes = list(transport.node_ids())
        now = time.monotonic()
        if len(nodes) >= count:
            if expected <= set(nodes):
                return nodes
            enough_since = now if enough_since is None else enough_since
            if now - enough_since >= grace_s:
                return nodes
        if now >= deadline:
            return nodes
        time.sleep(0.5)


def study_config(settings: StudySettings, **extra: Any) -> StudyConfig:
    """What every phase message carries: the protocol (sites keep no state between messages)
    and the phase's settings (with the split it works on, after the study's first)."""
    if settings.repeat:
        extra = {"repeat": settings.repeat, **extra}
    return StudyConfig.of(settings.protocol, **extra)


P = TypeVar("P")


def collect(replies: dict[str, Reply], failed: dict[str, str], name: str | None,
            cls: type[P], shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, P]:
    """Each reply's payload (packed under ``name``, or alone when None), checked; a site whose
    payload is malformed moves to ``failed`` with the reason instead of stopping the study."""
    out: dict[str, P] = {}
    for site, reply in replies.items():
        try:
            out[site] = (from_record(reply.content, cls, shapes, site) if name is None
                         else unpack(reply.content, name, cls, shapes, site))
        except PayloadError as exc:
            failed[site] = str(exc)
    return out


def exchange(transport: Transport, nodes: dict[int, str], message_type: MessageType,
             content: Callable[[int], Records], settings: StudySettings
             ) -> tuple[dict[str, Reply], dict[str, str]]:
    """One round: a message to each node, the replies by site name, and the sites that failed
    (by name, with the reason)."""
    replies: dict[str, Reply] = {}
    failed: dict[str, str] = {}
    orphans: list[str] = []
    for reply in transport.send_and_receive(message_type, {n: content(n) for n in nodes},
                                            settings.timeout_s):
        site = nodes.get(reply.node)
        if site is None:  # Flower's own error for a node that went silent
            orphans.append(why(reply))
        elif reply.has_error():
            failed[site] = f"{message_type}: {why(reply)}"
        else:
            replies[site] = reply
    for site, reason in unanswered(set(nodes.values()) - set(replies) - set(failed), orphans,
                                   settings.timeout_s):
        failed[site] = f"{message_type}: {reason}"
    return replies, failed


def why(reply: Reply) -> str:
    """What a reply that carries no payload says."""
    return reply.error or "a reply from a node that is not a site of the study"


def unanswered(sites: set[str], orphans: list[str], timeout_s: float
               ) -> list[tuple[str, str]]:
    """Why each of ``sites`` gave no reply of its own. Flower answers for a node that stopped
    sending heartbeats with an error from the SuperLink (not from the node): when there are as
    many such errors as silent sites, each site gets one; otherwise they are named together."""
    sites_sorted = sorted(sites)
    if orphans and len(orphans) == len(sites_sorted):
        return list(zip(sites_sorted, orphans, strict=True))
    reason = f"no reply within {timeout_s:g} s"
    if orphans:
        reason += f" ({'; '.join(sorted(set(orphans)))})"
    return [(site, reason) for site in sites_sorted]
