"""Phase 2, local preparation: ingest, standardize and extract (cached), then split train/test;
counts back."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
from sklearn.model_selection import train_test_split

from client.folds import site_folds
from client.manifest import read_manifest
from client.pipeline import features_table, run_cases
from client.report import record_prepare
from client.workspace import PREPARED_FILE, feature_columns, study_dir
from common.errors import MyeloFedError
from common.payloads import (
    PrepareReply,
    format_counts,
    label_counts,
    released,
)
from common.protocol import StudyProtocol, TaskKind
from common.provenance import atomic_write_parquet
from common.site_config import SiteConfig


def prepare(site: SiteConfig, protocol: StudyProtocol, seed: int, test_fraction: float
            ) -> PrepareReply:
    """Ingest, standardize and extract (cached), then split train/test, stratified by label and
    seeded by the study seed and the site's name: the split never changes across phases."""
    cases, problems = read_manifest(site.manifest, protocol, default_batch=site.site_name,
                                    data_root=site.data_root)
    outcomes = run_cases(cases, protocol, mode="extract", workers=site.n_workers,
                         cache_dir=site.cache_dir, max_voxels=site.budget,
                         time_limit_s=site.case_time_limit_s)
    skipped = Counter([p.reason.value for p in problems]
                      + [o.reason.value for o in outcomes if o.reason is not None])
    table = features_table(cases, outcomes, protocol).to_pandas()
    if len(table) < 4:
        return PrepareReply(site.site_name, "refused", "too_few_cases",
                            "fewer than 4 usable cases")  # not how many: the reply leaves
    labels = table[protocol.task.label_column].to_numpy()
    classification = protocol.task.kind is TaskKind.CLASSIFICATION
    stratify = labels if classification and np.min(np.unique(labels, return_counts=True)[1]) > 1 \
        else None
    state = int.from_bytes(hashlib.sha256(f"{seed}/{site.site_name}".encode()).digest()[:4],
                           "little")
    train, _ = train_test_split(np.arange(len(table)), test_size=test_fraction,
                                random_state=state, stratify=stratify)
    table["split"] = "test"
    table.loc[train, "split"] = "train"
    # cross-validation folds of the training rows, seeded like the split, built from atoms of
    # at least the site's floor (client/folds.py)
    table["fold"] = -1
    table.loc[train, "fold"] = site_folds(table.iloc[train], protocol, state, site.min_patients)
    atomic_write_parquet(study_dir(site, protocol) / PREPARED_FILE, table)
    names = feature_columns(table, protocol)
    is_train = table["split"] == "train"
    counts = table.loc[is_train, "batch"].value_counts().sort_index()

    def reply(floor: int) -> PrepareReply:  # counts as released() lets them leave
        return PrepareReply(
            site.site_name, "ok", n_train=released(int(is_train.sum()), floor),
            n_test=released(int((~is_train).sum()), floor),
            skipped=format_counts(sorted(skipped.items()), floor),
            train_labels=label_counts(protocol, list(labels[is_train.to_numpy()]), floor),
            test_labels=label_counts(protocol, list(labels[~is_train.to_numpy()]), floor),
            batches=format_counts(counts.items(), floor),
            n_features=len(names),
            features_hash=hashlib.sha256("\n".join(names).encode()).hexdigest(),
            feature_names=tuple(names))

    # the site's own report keeps every count; the reply, only those the floor lets leave
    record_prepare(site, protocol, reply(1), [
        {"case_id": c.case_id, "row": c.row, "reason": c.reason.value, "detail": c.detail}
        for c in [*problems, *(o for o in outcomes if o.reason is not None)]])
    return reply(site.min_patients)


def refused(site_name: str, exc: MyeloFedError) -> PrepareReply:
    """The answer of a site that cannot prepare (its error's type and first line)."""
    return PrepareReply(site_name, "refused", type(exc).__name__,
                        str(exc).splitlines()[0][:200])
