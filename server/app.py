"""The Flower ServerApp: the coordinator's study (``flwr run``).

Thin by design: it types the run config once (:class:`server.study.StudySettings`), wraps
Flower's ``Grid`` as the :class:`server.rounds.Transport` the phases send through, and runs the
study (:func:`server.orchestrator.run_study`). The phases themselves are in
:mod:`server.phases`, one module each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.messages import MessageType, StudyConfig
from server.orchestrator import run_study
from server.rounds import Reply
from server.strategy import PerSite, error_text, train_rounds
from server.study import Progress, StudySettings


class FlowerTransport:
    """The phases' :class:`server.rounds.Transport` over Flower's ``Grid``."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def send_and_receive(self, message_type: MessageType, contents: Mapping[int, RecordDict],
                         timeout_s: float) -> Iterable[Reply]:
        """Every node's reply. A reply the SuperLink lost on its way (Flower's
        ``MESSAGE_UNAVAILABLE``: the site answered, its upload did not complete, e.g. a busy
        SuperLink's database was locked) is asked for once more: every phase's request is
        answered the same way twice (the release ledger passes the same sums again)."""
        pending = dict(contents)
        for attempt in (1, 2):
            messages = {node: Message(content, message_type=message_type.value,
                                      dst_node_id=node, group_id=message_type.value)
                        for node, content in pending.items()}
            replies = list(self.grid.send_and_receive(list(messages.values()),
                                                      timeout=timeout_s))
            sent = {m.metadata.message_id: node for node, m in messages.items()}
            lost: dict[int, RecordDict] = {}
            for reply in replies:
                node = sent.get(reply.metadata.reply_to_message_id)
                if attempt == 1 and node is not None and reply.has_error() \
                        and reply.error.code == ErrorCode.MESSAGE_UNAVAILABLE:
                    log(WARNING, "myelofed: %s to node %s: %s; asking again", message_type,
                        node, error_text(reply))
                    lost[node] = pending[node]
                    continue
                yield Reply(reply.metadata.src_node_id,
                            None if reply.has_error() else reply.content,
                            error_text(reply) if reply.has_error() else "")
            if not lost:
                return
            pending = lost

    def train_rounds(self, strategy: PerSite, start: Mapping[str, np.ndarray], rounds: int,
                     timeout_s: float, study: StudyConfig) -> dict[str, np.ndarray]:
        return train_rounds(self.grid, strategy, start, rounds, timeout_s, study)


def _flower_log(line: str) -> None:
    log(INFO, "myelofed: %s", line)


def make_server_app(settings: StudySettings | None = None,
                    progress: Progress = _flower_log) -> ServerApp:
    """The ServerApp; ``settings`` None = from the run config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_study(FlowerTransport(grid),
                  settings or StudySettings.from_run_config(context.run_config), progress)

    return app


app = make_server_app()
