"""A site's folds: atoms as coarse as the study's sums need, no coarser; the repeated splits'
folds of atoms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from client.folds import (
    combat_subsets,
    fold_strata,
    inner_folds,
    named,
    outer_folds,
    site_folds,
    split_subsets,
    study_subsets,
    training_cases,
)
from client.ledger import isolable
from client.manifest import CaseSpec
from common.protocol import ModelSpec, StudyProtocol, protocol_from_mapping
from common.selection.terms import assign_folds
from common.synthetic import Task
from common.synthetic.write import study_protocol_mapping

RESPONSE = protocol_from_mapping(study_protocol_mapping(Task.RESPONSE, "MR")).model_copy(
    update={"model": ModelSpec(cv_folds=5, clinical=("iss_stage", "age"))})


def rows(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"case_id": [f"p{i}" for i in range(n)], "batch": "s1",
                         "response": rng.integers(0, 2, n), "sex": rng.choice(["F", "M"], n),
                         "iss_stage": rng.choice(["I", "II", "III"], n),
                         "age": rng.normal(65, 8, n)})


def test_the_folds_pass_the_ledger_and_are_the_coarsest_that_do():
    """Seeds 0, 17 and 4: label-only atoms pass; atoms by scanner and ISS stage are needed; no
    folds pass (an ISS stage x label cell under 5 at the site: the finest are kept, and the
    ledger will refuse the nomogram's terms)."""
    for seed, needed in ((0, 0), (17, 2), (4, None)):
        table = rows(60, seed)
        folds = site_folds(table, RESPONSE, seed, 5)
        label = table.response.to_numpy()
        strata = fold_strata(table, RESPONSE)
        candidates = [assign_folds(label, 5, seed, True, 5, strata[:k])
                      for k in range(len(strata) + 1)]
        passing = [k for k, c in enumerate(candidates)
                   if not isolable(study_subsets(table, c, RESPONSE), 5)]
        assert (passing[0] if passing else None) == needed
        np.testing.assert_array_equal(folds, candidates[len(strata) if needed is None
                                                        else needed])
        # every fold x label cell holds 0 or at least 5
        for fold in range(5):
            for value in (0, 1):
                n = int(np.sum((folds == fold) & (label == value)))
                assert n == 0 or n >= 5


def test_a_floor_of_one_gives_label_stratified_folds():
    table = rows(40, 1)
    folds = site_folds(table, RESPONSE, 3, 1)
    np.testing.assert_array_equal(folds, assign_folds(table.response.to_numpy(), 5, 3, True))


def test_the_folds_make_no_room_for_combat_sums_the_ledger_will_refuse():
    """With sex in ComBat's design and 3 women among the responders, ComBat's sums isolate them
    on their own (the site will take no part in ComBat): the folds are those the models alone
    need, not the finest."""
    with_sex = RESPONSE.model_copy(update={"covariates": RESPONSE.covariates.model_copy(
        update={"harmonize": ("age", "sex")})})
    table = rows(60, 0)
    table["sex"] = "M"
    table.loc[table.index[table.response == 1][:3], "sex"] = "F"
    table.loc[table.index[table.response == 0][:10], "sex"] = "F"
    assert isolable(named(table, combat_subsets(table, with_sex)), 5)
    folds = site_folds(table, with_sex, 0, 5)
    np.testing.assert_array_equal(folds, assign_folds(table.response.to_numpy(), 5, 0, True, 5))


#: The response study with four repeated splits (the model's CV folds are the other three),
#: without the nomogram: its ISS stage x label cells need more patients than 90 (see above).
REPEATED = RESPONSE.model_copy(update={
    "model": ModelSpec(cv_folds=3),
    "validation": RESPONSE.validation.model_copy(update={"repeats": 4})})


def cases_of(table: pd.DataFrame) -> list[CaseSpec]:
    return [CaseSpec(r.case_id, i, Path(f"{r.case_id}.nii.gz"), Path(f"{r.case_id}_roi.nii.gz"),
                     float(r.response), r.batch,
                     covariates={"sex": r.sex, "iss_stage": r.iss_stage, "age": float(r.age)})
            for i, r in enumerate(table.itertuples())]


def test_repeated_splits_are_folds_of_atoms_whose_sums_pass_the_ledger_together():
    """Four splits of 90 patients on two scanners: each case is tested once, each split trains
    on the other three folds and cross-validates over them, every fold x label cell holds 0 or
    at least 5, and every sum of all four splits fits one ledger. Four random splits of the
    same rows would let the coordinator isolate a few patients by differencing."""
    table = rows(90, 3)
    table["batch"] = np.where(np.arange(90) % 3 == 0, "s2", "s1")
    cases = cases_of(table)
    folds = outer_folds(cases, REPEATED, 0, "site_A", 5)
    assert set(folds) == set(table.case_id) and sorted(set(folds.values())) == [0, 1, 2, 3]
    outer = table.case_id.map(folds).to_numpy()
    # every fold x scanner x label cell holds 0 or at least 5: ComBat's sums per scanner and
    # label (the outcome is protected) differ between two splits by such a cell
    for fold in range(4):
        for scanner in ("s1", "s2"):
            for value in (0, 1):
                n = int(np.sum((outer == fold) & (table.batch == scanner)
                               & (table.response == value)))
                assert n == 0 or n >= 5, (fold, scanner, value, n)
    assert not isolable(split_subsets(table, outer, REPEATED), 5)
    for repeat in range(4):
        train = training_cases(cases, REPEATED, 0, "site_A", 0.3, 5, repeat)
        assert train == {c for c, f in folds.items() if f != repeat}
        inner = inner_folds(outer[outer != repeat], repeat)
        assert sorted(set(inner.tolist())) == [0, 1, 2]
    # the same site with splits drawn at random (each with its own folds of atoms): each
    # passes alone, together they do not
    single = REPEATED.model_copy(update={"validation": RESPONSE.validation})
    random_splits: set[tuple[str, ...]] = set()
    for seed in range(4):
        train = table[table.case_id.isin(training_cases(cases, single, seed, "site_A", 0.25))]
        subsets = study_subsets(train, site_folds(train, single, seed, 5), single)
        assert not isolable(subsets, 5)
        random_splits |= subsets
    assert isolable(random_splits, 5)


def test_repeated_splits_need_their_cross_validation_folds():
    with pytest.raises(ValidationError, match="model.cv_folds must be 3"):
        StudyProtocol.model_validate({**REPEATED.model_dump(), "model": RESPONSE.model})
    with pytest.raises(ValidationError, match="2 splits leave one fold"):
        StudyProtocol.model_validate({**REPEATED.model_dump(), "validation": {"repeats": 2}})
