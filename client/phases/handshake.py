"""Phase 1, the handshake: check the study protocol and this site's manifest against it; answer
with counts only."""

from __future__ import annotations

import json
from collections import Counter

from client.segment.masks import study_manifest
from common.errors import ConfigError
from common.payloads import HandshakeReply, format_counts, label_counts, released
from common.protocol import protocol_from_mapping
from common.site_config import SiteConfig


def handshake(site: SiteConfig, protocol_json: str, protocol_hash: str) -> HandshakeReply:
    """Check the study protocol and this site's manifest against it; answer with counts."""
    def refuse(code: str, reason: str) -> HandshakeReply:
        return HandshakeReply(site.site_name, "refused", protocol_hash, code, reason)

    try:
        protocol = protocol_from_mapping(json.loads(protocol_json), source="study protocol")
    except (ConfigError, json.JSONDecodeError) as exc:
        return refuse("protocol_invalid", str(exc).splitlines()[0][:200])
    if protocol.content_hash() != protocol_hash:
        return refuse("protocol_hash_mismatch",
                      "the protocol received does not match its hash (altered in transit, or "
                      "another software version)")
    try:
        cases, problems = study_manifest(site, protocol)
    except ConfigError as exc:
        return refuse("manifest_unusable", exc.problems[0][:200] if exc.problems else "")
    # every count leaves as released() lets it: 0, at least min_patients, or suppressed
    floor = site.min_patients
    return HandshakeReply(
        site.site_name, "ok", protocol_hash, n_rows=released(len(cases) + len(problems), floor),
        n_usable=released(len(cases), floor),
        skipped=format_counts(sorted(Counter(p.reason.value for p in problems).items()), floor),
        label_counts=label_counts(protocol, [c.label if c.event is None else c.event
                                                for c in cases], floor))


def refused(site_name: str, protocol_hash: str, exc: ConfigError) -> HandshakeReply:
    """The answer of a site whose own configuration is unusable."""
    return HandshakeReply(site_name, "refused", protocol_hash, "site_config_invalid",
                          exc.problems[0][:200] if exc.problems else "")
