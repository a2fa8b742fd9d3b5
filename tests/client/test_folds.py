"""A site's folds: atoms as coarse as the study's sums need, no coarser."""

from __future__ import annotations

import numpy as np
import pandas as pd

from client.folds import combat_subsets, fold_strata, named, site_folds, study_subsets
from client.ledger import isolable
from common.protocol import ModelSpec, protocol_from_mapping
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
