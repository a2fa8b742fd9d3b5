"""Phase 2, local preparation: ingest, standardize and extract (cached), then split train/test;
counts back."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

from client.folds import inner_folds, outer_folds, site_folds, split_state, training_cases
from client.pipeline import features_table, run_cases
from client.report import record_prepare
from client.segment.masks import study_manifest
from client.workspace import (
    PREPARED_FILE,
    feature_columns,
    load_image_standard,
    save_image_standard,
    tables_dir,
)
from common.errors import MyeloFedError
from common.payloads import (
    PrepareReply,
    format_counts,
    label_counts,
    released,
)
from common.protocol import StudyProtocol
from common.provenance import atomic_write_parquet
from common.site_config import SiteConfig
from harmonization.images import ImageStandard


def prepare(site: SiteConfig, protocol: StudyProtocol, seed: int, test_fraction: float,
            standard: ImageStandard | None = None, repeat: int = 0) -> PrepareReply:
    """Ingest, standardize (onto the study's image ``standard``, with histogram
    standardization) and extract (cached), then split train/test: the split of the manifest's
    usable cases (:func:`client.folds.training_cases`), so it never changes across phases.
    With repeated splits, split ``repeat`` of them; a later split reads the features the
    first one extracted (on the standard it kept) and writes its tables apart
    (:func:`client.workspace.tables_dir`)."""
    cases, problems = study_manifest(site, protocol)
    if standard is not None:
        save_image_standard(site, protocol, standard)
    elif repeat > 0:
        standard = load_image_standard(site, protocol)
    outcomes = run_cases(cases, protocol, mode="extract", workers=site.n_workers,
                         cache_dir=site.cache_dir, max_voxels=site.budget,
                         time_limit_s=site.case_time_limit_s, standard=standard)
    skipped = Counter([p.reason.value for p in problems]
                      + [o.reason.value for o in outcomes if o.reason is not None])
    table = features_table(cases, outcomes, protocol).to_pandas()
    if len(table) < 4:
        return PrepareReply(site.site_name, "refused", "too_few_cases",
                            "fewer than 4 usable cases")  # not how many: the reply leaves
    # what the counts count: the classes, or a survival task's events
    labels = table[protocol.task.event_column or protocol.task.label_column].to_numpy()
    state = split_state(seed, site.site_name)
    outer = (outer_folds(cases, protocol, seed, site.site_name, site.min_patients)
             if protocol.validation.repeats > 1 else None)
    training = training_cases(cases, protocol, seed, site.site_name, test_fraction,
                              site.min_patients, repeat, outer)
    train = np.flatnonzero(table["case_id"].astype(str).isin(training).to_numpy())
    if train.size < 2 or train.size == len(table):
        return PrepareReply(site.site_name, "refused", "too_few_cases",
                            "too few usable training or test cases")
    if protocol.task.event_column and not labels[train].any():
        # a stratum without events adds nothing to the Cox partial likelihood, and its test
        # rows rank no one
        return PrepareReply(site.site_name, "refused", "no_events",
                            "every training case is censored: no event to fit the survival "
                            "model on")
    table["split"] = "test"
    table.loc[train, "split"] = "train"
    # cross-validation folds of the training rows, seeded like the split, built from atoms of
    # at least the site's floor; with repeated splits, the other splits' test folds
    # (client/folds.py)
    table["fold"] = -1
    if outer is not None:
        table.loc[train, "fold"] = inner_folds(
            table["case_id"].iloc[train].astype(str).map(outer).to_numpy(), repeat)
    else:
        table.loc[train, "fold"] = site_folds(table.iloc[train], protocol, state,
                                              site.min_patients)
    atomic_write_parquet(tables_dir(site, protocol, repeat) / PREPARED_FILE, table)
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

    if repeat > 0:  # the site's report is of the study's first split
        return reply(site.min_patients)
    # the site's own report keeps every count; the reply, only those the floor lets leave
    record_prepare(site, protocol, reply(1), [
        {"case_id": c.case_id, "row": c.row, "reason": c.reason.value, "detail": c.detail}
        for c in [*problems, *(o for o in outcomes if o.reason is not None)]])
    return reply(site.min_patients)


def refused(site_name: str, exc: MyeloFedError) -> PrepareReply:
    """The answer of a site that cannot prepare (its error's type and first line)."""
    return PrepareReply(site_name, "refused", type(exc).__name__,
                        str(exc).splitlines()[0][:200])
