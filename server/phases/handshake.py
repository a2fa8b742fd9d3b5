"""Phase 1, the handshake: the protocol and its hash to every site; counts (or a refusal) back.
Sites that refused, failed, answered for another protocol or have too few usable cases are
excluded, by name, with the reason."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from common.messages import MessageType, StudyRequest
from common.payloads import HandshakeReply, shown_count
from common.provenance import atomic_write_json
from common.records import pack_request
from server.registry import site_names
from server.rounds import Transport, collect, exchange, study_config, wait_for_nodes
from server.study import StudySettings, excluded_detail


@dataclass(frozen=True)
class HandshakeSummary:
    """Which sites go on, which do not and why, and whether the study can go on."""

    sites: list[HandshakeReply]
    excluded: dict[str, str]   # site -> reason
    go_on: bool
    reason: str
    nodes: dict[int, str] = field(default_factory=dict)  # SuperNode id -> site name

    def to_json(self) -> dict[str, Any]:
        return {"sites": [asdict(s) for s in self.sites], "excluded": self.excluded,
                "go_on": self.go_on, "reason": self.reason}


def check_handshake(replies: list[HandshakeReply], failed: dict[str, str],
                    settings: StudySettings) -> HandshakeSummary:
    """Exclude sites that refused, failed or have too few usable cases; go on only with at
    least ``min_sites`` left. ``failed``: node -> error for nodes that gave no usable reply."""
    excluded = dict(failed)
    for reply in replies:
        if reply.status != "ok":
            excluded[reply.site] = f"refused: {reply.code} ({reply.reason})"
        elif reply.protocol_hash != settings.protocol.content_hash():
            excluded[reply.site] = "answered for another protocol"
        elif reply.n_usable < settings.min_cases_per_site:
            excluded[reply.site] = (f"{shown_count(reply.n_usable)} usable cases, fewer than "
                                    f"min-cases-per-site = {settings.min_cases_per_site}")
    kept = [r for r in replies if r.site not in excluded]
    go_on = len(kept) >= settings.min_sites
    reason = (f"{len(kept)} site(s) ready" if go_on else
              f"only {len(kept)} site(s) ready, fewer than min-sites = {settings.min_sites}"
              f"{excluded_detail(excluded)}")
    return HandshakeSummary(replies, excluded, go_on, reason)


def run_handshake(transport: Transport, settings: StudySettings,
                  registered: dict[int, str] | None = None) -> HandshakeSummary:
    """Phase 1: the protocol and its hash to every site; counts (or a refusal) back.

    ``registered`` (node ID -> site name; default: the coordinator's registry,
    :mod:`server.registry`) names the nodes before they answer, so a site that fails the
    handshake is excluded by its name; a node that answers under another name than it was
    registered with is excluded. The handshake waits for every registered site (up to
    :data:`server.rounds.JOIN_GRACE_S` once ``min_sites`` are connected); one that is not
    connected by then is excluded as such."""
    registered = site_names() if registered is None else registered
    nodes = {n: registered.get(n, f"node {n}")
             for n in wait_for_nodes(transport, settings.min_sites, settings.timeout_s,
                                     expected=registered)}
    started = time.monotonic()
    replies, failed = exchange(transport, nodes, MessageType.HANDSHAKE,
                               lambda _: pack_request(StudyRequest(study_config(settings))),
                               settings)
    for node, name in registered.items():
        if node not in nodes:
            failed[name] = "registered, not connected when the study began"
    seconds = time.monotonic() - started
    answers = collect(replies, failed, None, HandshakeReply)
    for sender, answer in list(answers.items()):
        name = registered.get(replies[sender].node)
        if name is not None and answer.site != name:
            failed[name] = f"registered as {name}, answered as {answer.site}"
            del answers[sender]
    nodes_of = {replies[sender].node: answer.site for sender, answer in answers.items()}
    summary = dataclasses.replace(check_handshake(list(answers.values()), failed, settings),
                                  nodes=nodes_of)
    atomic_write_json(settings.out_dir / "handshake.json",
                      {**summary.to_json(), "round_seconds": seconds})
    return summary
