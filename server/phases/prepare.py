"""Phase 2, local preparation: each site extracts its features (cached) and splits its rows;
counts back. Sites that refused, or computed other features than the majority, are excluded."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.messages import MessageType, StudyRequest
from common.payloads import SUPPRESSED, PrepareReply, parse_counts
from common.provenance import atomic_write_json
from common.records import pack_request
from harmonization.images import ImageStandard
from server.rounds import Transport, collect, exchange, study_config
from server.study import StudySettings, excluded_detail


@dataclass(frozen=True)
class PrepareSummary:
    sites: list[PrepareReply]
    excluded: dict[str, str]
    go_on: bool
    reason: str

    @property
    def kept(self) -> list[PrepareReply]:
        return [r for r in self.sites if r.site not in self.excluded]

    def to_json(self) -> dict[str, Any]:
        return {"sites": [asdict(s) for s in self.sites], "excluded": self.excluded,
                "go_on": self.go_on, "reason": self.reason}


def check_prepare(replies: list[PrepareReply], failed: dict[str, str],
                  settings: StudySettings) -> PrepareSummary:
    """Exclude sites that failed, refused, or computed other features than the majority."""
    excluded = dict(failed)
    ok = [r for r in replies if r.status == "ok"]
    for reply in replies:
        if reply.status != "ok":
            excluded[reply.site] = f"refused: {reply.code} ({reply.reason})"
    if ok:
        majority, _ = Counter(r.features_hash for r in ok).most_common(1)[0]
        for reply in ok:
            if reply.features_hash != majority:
                excluded[reply.site] = "computed other features than the other sites"
    kept = [r for r in replies if r.site not in excluded]
    go_on = len(kept) >= settings.min_sites
    reason = (f"{len(kept)} site(s) prepared" if go_on else
              f"only {len(kept)} site(s) prepared, fewer than min-sites = {settings.min_sites}"
              f"{excluded_detail(excluded)}")
    return PrepareSummary(replies, excluded, go_on, reason)


def run_prepare(transport: Transport, nodes: dict[int, str], settings: StudySettings,
                standard: ImageStandard | None = None) -> PrepareSummary:
    """Phase 2: each site extracts (cached; its images standardized onto the study's
    ``standard`` with histogram standardization) and splits; counts back."""
    started = time.monotonic()
    # the sites get the standard landmarks and targets only, not the other sites' scanners'
    shared = None if standard is None else standard.shared()
    config = study_config(settings, seed=settings.seed, test_fraction=settings.test_fraction,
                          image_standard=None if shared is None else shared.to_json())
    replies, failed = exchange(transport, nodes, MessageType.PREPARE,
                               lambda _: pack_request(StudyRequest(config)), settings)
    parsed = list(collect(replies, failed, None, PrepareReply).values())
    summary = check_prepare(parsed, failed, settings)
    atomic_write_json(settings.out_dir / "prepare.json",
                      {**summary.to_json(), "round_seconds": time.monotonic() - started})
    return summary


def load_prepare(out_dir: Path) -> PrepareSummary:
    """The local-preparation summary a finished phase 2 wrote (``prepare.json``)."""
    data = json.loads((out_dir / "prepare.json").read_text())
    sites = [PrepareReply(**{**s, "feature_names": tuple(s.get("feature_names", ()))})
             for s in data["sites"]]
    return PrepareSummary(sites, dict(data["excluded"]), bool(data["go_on"]), str(data["reason"]))


def training_prevalence(kept: list[PrepareReply]) -> float | None:
    """The share of positives among the training rows of the sites that go on (from their
    ``train_labels`` counts, without a site whose counts were suppressed as under its minimum;
    None for regression or without counts)."""
    counts: Counter[str] = Counter()
    for reply in kept:
        site = parse_counts(reply.train_labels)
        if SUPPRESSED not in site.values():
            counts.update(site)
    total = sum(counts.values())
    return counts.get("1", 0) / total if total else None
