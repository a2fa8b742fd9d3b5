"""What a site does in each phase of a federated study, independent of Flower.

``client/app.py`` unpacks a message, calls one function here and packs the reply. Replies carry
counts, sums and codes, never a path, a traceback or a patient's value.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError
from common.protocol import StudyProtocol, TaskKind, protocol_from_mapping
from common.site_config import SiteConfig, load_site_config


@dataclass(frozen=True)
class HandshakeReply:
    """A site's answer to the study protocol: counts only.

    ``status`` is ``"ok"`` or ``"refused"``; a refusal carries a stable ``code`` and a short
    ``reason`` (no path). ``label_counts`` is ``"0:n0,1:n1"`` for classification (empty for
    regression); ``skipped`` is ``"reason:count,..."``.
    """

    site: str
    status: str
    protocol_hash: str
    code: str = ""
    reason: str = ""
    n_rows: int = 0
    n_usable: int = 0
    skipped: str = ""
    label_counts: str = ""


def resolve_site(node_config: dict[str, object], run_config: dict[str, object]) -> SiteConfig:
    """This SuperNode's site: from ``site-config`` (a site config file, in deployment) or, in
    the simulation engine, from the run's ``simulation-cohort`` folder and the node's
    ``partition-id`` (the cohort's sites in name order)."""
    if node_config.get("site-config"):
        return load_site_config(Path(str(node_config["site-config"])))
    cohort = str(run_config.get("simulation-cohort", "") or "")
    if not cohort or "partition-id" not in node_config:
        raise ConfigError("node config", ["set 'site-config' (deployment) or the run config's "
                                          "'simulation-cohort' (simulation)"])
    root = Path(cohort)
    sites = sorted(p.parent for p in root.glob("*/manifest.csv"))
    index = int(str(node_config["partition-id"]))
    if not 0 <= index < len(sites):
        raise ConfigError(str(root), [f"partition {index} has no site: {len(sites)} site "
                                      "folders with a manifest.csv"])
    site = sites[index]
    return SiteConfig(site_name=site.name, manifest=site / "manifest.csv",
                      work_dir=root / "work" / site.name)


def handshake(site: SiteConfig, protocol_json: str, protocol_hash: str) -> HandshakeReply:
    """Check the study protocol and this site's manifest against it; answer with counts."""
    from client.manifest import read_manifest

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
        cases, problems = read_manifest(site.manifest, protocol, default_batch=site.site_name)
    except ConfigError as exc:
        return refuse("manifest_unusable", exc.problems[0][:200] if exc.problems else "")
    return HandshakeReply(
        site.site_name, "ok", protocol_hash, n_rows=len(cases) + len(problems),
        n_usable=len(cases),
        skipped=",".join(f"{k}:{v}" for k, v in sorted(Counter(
            p.reason.value for p in problems).items())),
        label_counts=_label_counts(protocol, [c.label for c in cases]))


def _label_counts(protocol: StudyProtocol, labels: list[float]) -> str:
    if protocol.task.kind is not TaskKind.CLASSIFICATION:
        return ""
    counts = Counter(int(v) for v in labels)
    return ",".join(f"{k}:{counts.get(k, 0)}" for k in (0, 1))
