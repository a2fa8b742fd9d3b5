"""The coordinator's site registry: names for node IDs, in the study's exclusions."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from common.payloads import HandshakeReply
from common.protocol import load_protocol
from common.records import to_record
from server.phases.handshake import run_handshake
from server.registry import check_new, load_registry, record, remove, site_names
from server.rounds import Reply
from server.study import StudySettings


def test_the_registry_records_names_refuses_twins_and_unregisters(tmp_path: Path):
    path = tmp_path / "sites.json"
    keys = {}
    for name in ("site_A", "site_B"):
        keys[name] = tmp_path / f"{name}.pub"
        keys[name].write_text(f"ecdsa-sha2-nistp384 AAAA{name} {name}\n")
        check_new(path, name, keys[name])
        record(path, name, {"site_A": 11, "site_B": 22}[name], keys[name])
    assert site_names(path) == {11: "site_A", 22: "site_B"}
    assert path.stat().st_mode & 0o077 == 0
    with pytest.raises(ConfigError, match="a site of this name is registered"):
        check_new(path, "site_A", tmp_path / "site_A.pub")
    other = tmp_path / "other.pub"
    other.write_text(keys["site_B"].read_text())
    with pytest.raises(ConfigError, match="this key is registered as site site_B"):
        check_new(path, "site_C", other)
    assert remove(path, "site_A").node_id == 11
    assert set(load_registry(path)) == {"site_B"}
    with pytest.raises(ConfigError, match=r"registered: site_B"):
        remove(path, "site_A")


class Answering:
    """Nodes 11, 22, 33 that answer the handshake as the site names given (None: silent)."""

    def __init__(self, answers: dict[int, str | None], protocol_hash: str) -> None:
        self.answers, self.protocol_hash = answers, protocol_hash

    def node_ids(self) -> list[int]:
        return sorted(self.answers)

    def send_and_receive(self, message_type, contents, timeout_s):  # noqa: ANN001, ANN201
        return [Reply(node, to_record(HandshakeReply(
            site=name, status="ok", protocol_hash=self.protocol_hash, n_rows=40, n_usable=40)))
            if name is not None else Reply(node, error="error 504: the site did not answer")
            for node, name in self.answers.items() if node in contents]


def test_the_handshake_names_nodes_by_the_registry_and_excludes_an_impostor(tmp_path: Path):
    protocol = load_protocol("preset:spine_mri_t1w")
    settings = StudySettings(protocol, tmp_path, min_sites=1, timeout_s=5)
    transport = Answering({11: "site_A", 22: "site_A", 33: None}, protocol.content_hash())
    summary = run_handshake(transport, settings, {11: "site_A", 22: "site_B", 33: "site_C"})
    assert [s.site for s in summary.sites if s.site not in summary.excluded] == ["site_A"]
    assert summary.excluded["site_B"] == "registered as site_B, answered as site_A"
    assert "site_C" in summary.excluded  # silent, yet named
    assert not any(name.startswith("node ") for name in summary.excluded)
