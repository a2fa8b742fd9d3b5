"""The Flower ServerApp: the coordinator's study, phase by phase (``flwr run``).

Thin by design: it types the run config once, sends each phase's messages, unpacks the replies
with :mod:`common.records` and calls :mod:`server.study` for every decision.
Phases built so far: 1, the handshake.
"""

from __future__ import annotations

import json
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from client.study import HandshakeReply
from common.provenance import atomic_write_json
from common.records import PayloadError, from_record
from server.study import HandshakeSummary, StudySettings, check_handshake


def wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> list[int]:
    """The connected SuperNodes, once at least ``count`` are there (or when time is up)."""
    deadline = time.monotonic() + timeout_s
    nodes = list(grid.get_node_ids())
    while len(nodes) < count and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    return nodes


def run_handshake(grid: Grid, settings: StudySettings) -> HandshakeSummary:
    """Phase 1: the protocol and its hash to every site; counts (or a refusal) back."""
    nodes = wait_for_nodes(grid, settings.min_sites, settings.timeout_s)
    protocol = json.dumps(settings.protocol.model_dump(mode="json"), sort_keys=True)
    messages = [
        Message(RecordDict({"study": ConfigRecord({
            "protocol": protocol, "protocol_hash": settings.protocol.content_hash()})}),
            message_type="query.handshake", dst_node_id=node, group_id="handshake")
        for node in nodes
    ]
    replies, failed = [], {}
    for reply in grid.send_and_receive(messages, timeout=settings.timeout_s):
        sender = f"node {reply.metadata.src_node_id}"
        if reply.has_error():
            failed[sender] = f"error {reply.error.code}: {reply.error.reason}"
            continue
        try:
            replies.append(from_record(reply.content, HandshakeReply, sender=sender))
        except PayloadError as exc:
            failed[sender] = str(exc)
    summary = check_handshake(replies, failed, settings)
    atomic_write_json(settings.out_dir / "handshake.json", summary.to_json())
    return summary


def run_study(grid: Grid, settings: StudySettings) -> None:
    summary = run_handshake(grid, settings)
    if not summary.go_on:
        raise RuntimeError(f"study stopped after the handshake: {summary.reason}")


def make_server_app(settings: StudySettings | None = None) -> ServerApp:
    """The ServerApp; ``settings`` None = from the run config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_study(grid, settings or StudySettings.from_run_config(context.run_config))

    return app


app = make_server_app()
