"""A site's cross-validation folds: made of atoms, as coarse as privacy needs and no coarser.

The folds of the training rows are built from atoms of at least the site's ``min_patients``
(:func:`common.selection.terms.assign_folds`), so no two fits' sums differ by fewer patients of a
label. The model's fold sums also meet the other phases' sums over the same patients (ComBat's per
scanner and covariate level, the nomogram's per clinical level), and the release ledger
(:mod:`client.ledger`) refuses a reply that would let a combination of them isolate fewer than
the minimum. Splitting the atoms by those groups too rules that out, but coarser folds make the
cross-validation (and a site's local-only model) noisier. So the site tries the groups in turn
(none; the scanner; the nomogram's clinical levels; ComBat's categorical covariates) and keeps
the first folds under which every sum the study will ask of it passes the ledger's check
(ComBat's left out where they fail it on their own: the site then takes no part in ComBat).

Repeated splits (``validation.repeats`` = K) follow the same rule one level up: the site's
usable cases fall into K folds made of atoms (:func:`outer_folds`), split ``r`` tests on fold
``r`` and trains on the others, which are also its cross-validation folds. Every sum of every
split is then over a union of atoms, and the folds are kept only where the ledger's check
passes for all K splits' sums together: a coordinator that subtracts two splits' sums gets a
sum over whole atoms, never over the few patients two random splits would differ by.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from client.ledger import crossed, isolable, scanner_subsets
from client.manifest import CaseSpec
from common.payloads import MIN_ROWS_SENT
from common.protocol import StudyProtocol, TaskKind
from common.selection.terms import IndexArray, assign_folds


def split_state(seed: int, site_name: str) -> int:
    """The random state of a site's split and folds: the study seed and the site's name."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{site_name}".encode()).digest()[:4], "little")


def training_cases(cases: Sequence[CaseSpec], protocol: StudyProtocol, seed: int,
                   site_name: str, test_fraction: float, min_patients: int = MIN_ROWS_SENT,
                   repeat: int = 0, outer: dict[str, int] | None = None) -> set[str]:
    """The case ids of a site's training split: the manifest's usable cases split once,
    stratified by label (for classification, when every class has two cases or more; by event
    for survival), seeded
    by :func:`split_state`. The image harmonization phase and the preparation both use it, so
    the split never changes across phases (a case that later fails to extract is dropped from
    its side). With repeated splits, split ``repeat``'s: every case outside its test fold of
    :func:`outer_folds` (``outer`` where the caller has them; ``test_fraction`` is not
    used)."""
    if protocol.validation.repeats > 1:
        folds = outer if outer is not None else outer_folds(cases, protocol, seed, site_name,
                                                            min_patients)
        return {case for case, fold in folds.items() if fold != repeat}
    if len(cases) < 2:
        return {c.case_id for c in cases}
    labels = np.array([c.label if c.event is None else c.event for c in cases])
    stratify = labels if stratified(protocol) and \
        np.min(np.unique(labels, return_counts=True)[1]) > 1 else None
    train, _ = train_test_split(np.arange(len(cases)), test_size=test_fraction,
                                random_state=split_state(seed, site_name), stratify=stratify)
    return {cases[i].case_id for i in train}


def stratified(protocol: StudyProtocol) -> bool:
    """Whether a site's split and folds are stratified: by class, or by a survival task's
    event (so that every fold has events to fit and to score)."""
    return protocol.task.kind in (TaskKind.CLASSIFICATION, TaskKind.SURVIVAL)


def fold_strata(rows: pd.DataFrame, protocol: StudyProtocol) -> list[np.ndarray]:
    """What a site's fold atoms may be split by beside the label, in the order tried: the
    scanner, the nomogram's categorical clinical columns and ComBat's categorical covariates."""
    categorical = protocol.covariates.categorical
    columns = ["batch", *[c for c in protocol.model.clinical if c in categorical],
               *[c for c in categorical
                 if protocol.covariates.harmonized(c) and c not in protocol.model.clinical]]
    return [rows[c].astype(str).to_numpy() for c in columns if c in rows.columns]


def combat_subsets(rows: pd.DataFrame, protocol: StudyProtocol) -> list[np.ndarray]:
    """The masks of the training ``rows`` ComBat's sums are over, as its phase enters them in
    the release ledger: per scanner and level of a categorical covariate (and label, when the
    outcome is protected), and two covariates' levels crossed."""
    categorical = [c for c in protocol.covariates.categorical
                   if protocol.covariates.harmonized(c) and c in rows.columns]
    levels = [rows[c].astype(str).to_numpy() for c in categorical]
    if protocol.task.kind is TaskKind.CLASSIFICATION and protocol.covariates.protect_outcome:
        levels.append(rows[protocol.task.label_column].astype(str).to_numpy())
    return scanner_subsets(rows["batch"].astype(str).to_numpy(), levels)


def study_subsets(rows: pd.DataFrame, folds: IndexArray, protocol: StudyProtocol,
                  combat: bool = True) -> set[tuple[str, ...]]:
    """The subsets of the training ``rows`` (as case ids) whose sums the study will ask of the
    site, as the phases enter them in the release ledger: ComBat's (unless ``combat`` is
    False); the model's comoments and fold complements, by label; the nomogram's per clinical
    level, by label."""
    classification = protocol.task.kind is TaskKind.CLASSIFICATION
    label = rows[protocol.task.label_column].astype(str).to_numpy()
    masks = combat_subsets(rows, protocol) if combat else []
    by_label = crossed(len(rows), [label] if classification else [])
    for fold in [-1, *np.unique(folds)]:
        masks += [(folds != fold) & part for part in by_label]
    levels = [rows[c].astype(str).to_numpy() for c in protocol.model.clinical
              if c in protocol.covariates.categorical and c in rows.columns]
    masks += crossed(len(rows), ([label] if classification else []) + levels)
    return named(rows, masks)


def named(rows: pd.DataFrame, masks: list[np.ndarray]) -> set[tuple[str, ...]]:
    """The non-empty ``masks`` over ``rows`` as sets of case ids, as the ledger keeps them."""
    ids = rows["case_id"].astype(str).to_numpy()
    return {tuple(sorted(ids[m])) for m in masks if m.any()}


def case_rows(cases: Sequence[CaseSpec], protocol: StudyProtocol) -> pd.DataFrame:
    """The manifest's usable cases as the columns the study's sums are split by: the case id,
    the scanner, the label (and a survival task's event) and the covariates."""
    task = protocol.task
    data: dict[str, list[object]] = {"case_id": [c.case_id for c in cases],
                                     "batch": [c.batch for c in cases],
                                     task.label_column: [c.label for c in cases]}
    if task.event_column:
        data[task.event_column] = [c.event for c in cases]
    for column in protocol.covariates.columns:
        data[column] = [c.covariates.get(column) for c in cases]
    return pd.DataFrame(data)


def outer_folds(cases: Sequence[CaseSpec], protocol: StudyProtocol, seed: int, site_name: str,
                min_patients: int) -> dict[str, int]:
    """Each usable case's fold 0..K-1 (K = ``validation.repeats``), seeded by
    :func:`split_state`: the first folds, by ever finer atoms of at least ``min_patients``
    (per label, then per scanner and categorical level as :func:`site_folds` tries them), under
    which no combination of the sums all K splits ask of the site covers 1 to
    ``min_patients`` - 1 patients; failing that, the first under which the models' sums pass
    without ComBat's (the site then takes no part in ComBat); the finest when none does. A
    group of fewer than K atoms fills fewer folds, so a small site may have splits without a
    test case of a class."""
    rows = case_rows(cases, protocol)
    labels = rows[protocol.task.event_column or protocol.task.label_column].to_numpy()
    strata = fold_strata(rows, protocol)
    repeats, state = protocol.validation.repeats, split_state(seed, site_name)
    candidates = [assign_folds(labels, repeats, state, stratified(protocol), min_patients,
                               strata[:k]) for k in range(len(strata) + 1)]
    # unlike a single split's folds, these decide whether ComBat's sums pass: try with them
    chosen = next((folds for combat in (True, False) for folds in candidates
                   if not isolable(split_subsets(rows, folds, protocol, combat), min_patients)),
                  candidates[-1])
    return dict(zip(rows["case_id"].astype(str), chosen.tolist(), strict=True))


def inner_folds(outer: np.ndarray, repeat: int) -> IndexArray:
    """The cross-validation folds of split ``repeat``'s training rows: their outer folds,
    numbered 0..K-2."""
    outer = np.asarray(outer, dtype=np.int64)
    return np.where(outer > repeat, outer - 1, outer)


def split_subsets(rows: pd.DataFrame, folds: np.ndarray, protocol: StudyProtocol,
                  combat: bool = True) -> set[tuple[str, ...]]:
    """The subsets the sums of every split of ``folds`` are over (:func:`study_subsets` of
    each split's training rows; ComBat's unless ``combat`` is False)."""
    return set().union(*(study_subsets(rows[folds != r], inner_folds(folds[folds != r], r),
                                       protocol, combat)
                         for r in range(protocol.validation.repeats)))


def site_folds(rows: pd.DataFrame, protocol: StudyProtocol, seed: int, min_patients: int
               ) -> IndexArray:
    """Fold numbers of the training ``rows``: the first folds, by ever finer atoms, under which
    no combination of the study's sums at this site covers 1 to ``min_patients`` - 1 patients;
    the finest when none does (the ledger then refuses what it must)."""
    labels = rows[protocol.task.event_column or protocol.task.label_column].to_numpy()
    strata = fold_strata(rows, protocol)
    # where ComBat's sums isolate patients on their own, the ledger refuses them whatever the
    # folds, and the site's models use raw features: the folds need not make room for them
    combat = not isolable(named(rows, combat_subsets(rows, protocol)), min_patients)
    for k in range(len(strata) + 1):
        folds = assign_folds(labels, protocol.model.cv_folds, seed, stratified(protocol),
                             min_patients, strata[:k])
        if not isolable(study_subsets(rows, folds, protocol, combat), min_patients):
            break
    return folds
