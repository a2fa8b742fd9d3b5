"""The ServerApp's transport over Flower's Grid, with a stand-in Grid."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from common.messages import MessageType
from server.app import FlowerTransport

SUPERLINK = 1  # the node Flower's own error replies come from


@pytest.fixture(autouse=True)
def in_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower makes messages inside a run only: this process plays a run's ServerApp."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK)
    monkeypatch.setattr(TaskIdentity, "_task_id", 3)


class LossyGrid:
    """Answers every message; the first time, the SuperLink loses node 12's reply (as a locked
    database did in a 20-site federation) and node 13 refuses."""

    def __init__(self, lose: bool = True) -> None:
        self.calls: list[list[int]] = []
        self.lose = lose

    def send_and_receive(self, messages, timeout=None):  # noqa: ANN001, ANN201
        self.calls.append([m.metadata.dst_node_id for m in messages])
        for k, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"m{len(self.calls)}-{k}"
            node = message.metadata.dst_node_id
            if node == 12 and (self.lose or len(self.calls) == 1):
                yield _reply(SUPERLINK, message, ErrorCode.MESSAGE_UNAVAILABLE,
                             "Reply message objects are unavailable.")
            elif node == 13:
                yield _reply(node, message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "refused")
            else:
                yield _reply(node, message)


def _reply(src: int, message, code: int | None = None, reason: str = ""):  # noqa: ANN001, ANN202
    return SimpleNamespace(
        metadata=SimpleNamespace(src_node_id=src, reply_to_message_id=message.metadata.message_id),
        has_error=lambda: code is not None, error=SimpleNamespace(code=code, reason=reason),
        content=RecordDict({"x": ConfigRecord({"node": src})}))


def _ask(grid: LossyGrid) -> dict[int, str]:
    contents = {n: RecordDict({"q": ConfigRecord({"n": n})}) for n in (11, 12, 13)}
    return {r.node: r.error for r in FlowerTransport(grid).send_and_receive(
        MessageType.PREPARE, contents, timeout_s=5)}


def test_a_reply_the_superlink_lost_is_asked_for_once_more():
    grid = LossyGrid(lose=False)
    assert _ask(grid) == {11: "", 12: "", 13: "error 2: refused"}
    assert grid.calls == [[11, 12, 13], [12]]  # a site's refusal is not asked again


def test_a_reply_lost_twice_is_flowers_error_as_before():
    grid = LossyGrid(lose=True)
    assert _ask(grid) == {11: "", SUPERLINK: "error 3: Reply message objects are unavailable.",
                          13: "error 2: refused"}
    assert grid.calls == [[11, 12, 13], [12]]
