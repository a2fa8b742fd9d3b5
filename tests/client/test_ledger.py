"""The site's release ledger: no combination of the sums a site has sent in a study is a sum over
1 to minimum - 1 patients, across replies, phases and restarts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.ledger import LEDGER_FILE, ReleaseRefused, isolable, release, scanner_subsets

ROWS = [f"p{i:02d}" for i in range(30)]


def mask(indices: range | list[int]) -> np.ndarray:
    out = np.zeros(len(ROWS), dtype=bool)
    out[list(indices)] = True
    return out


def test_two_sums_one_patient_apart_are_refused_and_nothing_is_recorded(tmp_path: Path):
    release(tmp_path, "first", ROWS, [mask(range(30))])
    before = (tmp_path / LEDGER_FILE).read_text()
    with pytest.raises(ReleaseRefused, match="second: .* fewer than 5 patients"):
        release(tmp_path, "second", ROWS, [mask(range(29))])
    assert (tmp_path / LEDGER_FILE).read_text() == before


def test_folds_of_atoms_pass_across_many_releases(tmp_path: Path):
    folds = np.arange(30) // 6  # 5 folds of 6
    for k in range(5):
        release(tmp_path, f"without fold {k}", ROWS, [folds != k])
    release(tmp_path, "again, a later round", ROWS, [folds != k for k in range(5)])
    stored = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert len(stored["subsets"]) == 5


def test_the_ledger_holds_across_runs_of_the_study(tmp_path: Path):
    """A restarted or repeated run reads what the earlier one sent: a training set that moved
    by two patients (another split) is refused."""
    release(tmp_path, "run 1", ROWS, [mask(range(20))])
    with pytest.raises(ReleaseRefused, match="run 2"):
        release(tmp_path, "run 2", ROWS, [mask([*range(2, 20), 25, 26])])


def test_additive_levels_do_not_isolate_their_small_cross_cell():
    """Sums over a scanner's patients, its women and its positives (an additive design) cut cross
    cells of 3 patients (women positive, men negative), but a combination that vanishes off the
    first must be nonzero on the second too: 6 patients, not fewer than 5."""
    scanner = set(ROWS)
    women = set(ROWS[:15])
    positives = set(ROWS[12:27])
    subsets = {tuple(sorted(s)) for s in (scanner, women, positives)}
    assert not isolable(subsets, 5)
    # their intersection as a sum of its own is a different matter
    assert isolable(subsets | {tuple(sorted(women & positives))}, 5)
    # and with cross cells of 2, the two of them together are 4 patients
    small = {tuple(sorted(s)) for s in (set(ROWS[:20]), set(ROWS[:10]), set(ROWS[8:18]))}
    assert isolable(small, 5)


def test_differences_of_differences_are_caught():
    """No single pair differs by few patients, but a combination of three sums does:
    (A + B) - (A + B without 1) spread over overlapping sets."""
    a, b, c = set(ROWS[:10]), set(ROWS[10:20]), set(ROWS[5:15])
    odd = (c - {ROWS[7]}) | set(ROWS[20:30])
    subsets = {tuple(sorted(s)) for s in (a, b, c, odd, set(ROWS[20:30]))}
    assert isolable(subsets, 5)


def test_the_minimum_is_the_sites(tmp_path: Path):
    """A site that allows sums over 3 patients (its min_patients) lets a 3-patient cell go."""
    release(tmp_path, "ComBat", ROWS, [mask(range(30)), mask(range(3))], min_rows=3)
    with pytest.raises(ReleaseRefused, match="fewer than 4 patients"):
        release(tmp_path, "model", ROWS, [mask(range(4, 30))], min_rows=4)


def test_an_unreadable_ledger_stops_every_release(tmp_path: Path):
    (tmp_path / LEDGER_FILE).write_text("{not json")
    with pytest.raises(ReleaseRefused, match=r"release_ledger\.json cannot be read"):
        release(tmp_path, "any", ROWS, [mask(range(30))])


def test_case_ids_must_be_unique(tmp_path: Path):
    with pytest.raises(ReleaseRefused, match="not unique"):
        release(tmp_path, "any", ["a", "a", "b", "c", "d", "e"], [np.ones(6, dtype=bool)])


def test_a_scanners_sums_by_sex_and_by_label_isolate_nobody():
    """The demo's site A in ComBat's first round: one scanner, its women, men, negatives and
    positives (a cell of 2 women positive, 12, 8 and 6 in the others): every combination that
    vanishes on the large cells vanishes everywhere (a regression: a relative tolerance on a
    zero matrix once called this isolable)."""
    sex = ["F"] * 14 + ["M"] * 14
    label = [0] * 12 + [1] * 2 + [0] * 8 + [1] * 6

    def subset(keep: list[bool]) -> tuple[str, ...]:
        return tuple(sorted(r for r, k in zip(ROWS[:28], keep, strict=True) if k))

    subsets = {subset([True] * 28), subset([s == "F" for s in sex]),
               subset([s == "M" for s in sex]), subset([v == 0 for v in label]),
               subset([v == 1 for v in label])}
    assert not isolable(subsets, 5)


def test_combats_design_round_counts_two_covariates_crossed():
    """The same site as ComBat's design round sends it: ``X'X`` counts the women among the
    positives (2), so the subsets of that round hold the crossing and are isolable; the later
    rounds (per scanner, by level) are not."""
    sex = np.array(["F"] * 14 + ["M"] * 14)
    label = np.array(["0"] * 12 + ["1"] * 2 + ["0"] * 8 + ["1"] * 6)
    batch = np.array(["s1"] * 28)

    def ids(masks: list[np.ndarray]) -> set[tuple[str, ...]]:
        return {tuple(sorted(np.asarray(ROWS[:28])[m])) for m in masks if m.any()}

    design = scanner_subsets(batch, [sex, label])
    assert ids([(sex == "F") & (label == "1")]) <= ids(design)
    assert isolable(ids(design), 5)
    assert not isolable(ids(scanner_subsets(batch, [sex, label], only=["s1"])), 5)
