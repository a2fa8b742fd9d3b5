"""The coordinator's side of a study, independent of Flower: settings and the checks between
phases. ``server/app.py`` sends the messages and calls these."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from client.study import HandshakeReply
from common.errors import ConfigError
from common.protocol import StudyProtocol, load_protocol


@dataclass(frozen=True)
class StudySettings:
    """What the coordinator decides for a run (Flower's run config, typed once)."""

    protocol: StudyProtocol
    out_dir: Path
    min_sites: int = 2
    min_cases_per_site: int = 10
    timeout_s: float = 600.0

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> StudySettings:
        try:
            protocol = load_protocol(str(run_config.get("protocol", "preset:spine_mri_t1w")))
            settings = cls(protocol, Path(str(run_config.get("out-dir", "myelofed-study"))),
                           int(run_config.get("min-sites", 2)),
                           int(run_config.get("min-cases-per-site", 10)),
                           float(run_config.get("timeout-s", 600.0)))
        except (TypeError, ValueError) as exc:
            raise ConfigError("run config", [str(exc)]) from None
        if settings.min_sites < 1 or settings.min_cases_per_site < 1:
            raise ConfigError("run config", ["min-sites and min-cases-per-site must be >= 1"])
        return settings


@dataclass(frozen=True)
class HandshakeSummary:
    """Which sites go on, which do not and why, and whether the study can go on."""

    sites: list[HandshakeReply]
    excluded: dict[str, str]   # site -> reason
    go_on: bool
    reason: str

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
            excluded[reply.site] = (f"{reply.n_usable} usable cases, fewer than "
                                    f"min-cases-per-site = {settings.min_cases_per_site}")
    kept = [r for r in replies if r.site not in excluded]
    go_on = len(kept) >= settings.min_sites
    reason = (f"{len(kept)} site(s) ready" if go_on else
              f"only {len(kept)} site(s) ready, fewer than min-sites = {settings.min_sites}")
    return HandshakeSummary(replies, excluded, go_on, reason)
