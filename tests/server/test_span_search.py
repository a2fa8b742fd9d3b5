"""The coordinator's search over a whole study (issue 22's acceptance): it runs federated ComBat,
the radiomics model on raw and harmonized features and the nomogram through the sites' real code,
keeps every reply of a small site, and looks for any combination of them that covers 1 to
``min_patients - 1`` of its patients.

The search does not read the release ledger's bookkeeping: it measures what each number a site
sent depends on, by replaying the coordinator's requests to copies of the site whose data differ
in one patient:

- **shifting one patient's features and age** by the same small amount tells, for every number
  that is a sum linear in those values (the first round of a fit, ComBat's sums, the nomogram's
  zero-coefficient terms, a harmonized feature's sum), how much that patient weighs in it; the
  coordinator knows these weights (they depend on the request, the patient's fold, label and
  levels, not on their values), so any vector in the span of those weight rows is a sum it can
  compute. The numbers that are not linear in the values (later Newton rounds, sums of squares,
  metrics) are left out of this part: their per-patient weights depend on the unknown values.
- **adding a copy of one patient** tells, for every number that no feature shift moves (counts
  of a scanner, a level, a label, a fold and their crossings), which patients it counts; any
  vector of that span supported on few patients is a count of a small group.

Either span holding a vector supported on 1 to ``min_patients - 1`` patients is a leak. The
search finds them in what a site sent before atoms and the ledger (the check that it can fail):
the sums of a fold's two responders, and, where three of the site's responders are women, their
count in ComBat's ``X'X`` (a crossing of two covariates that the ledger now holds to the same
rule). It finds none in a full study today.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

import client.phases.combat as combat
import client.phases.radiomics as radiomics
import client.phases.validation as validation
from client.folds import site_folds
from client.workspace import PREPARED_FILE, study_dir
from common.errors import MyeloFedError
from common.messages import MessageType
from common.payloads import MIN_ROWS_SENT, PrepareReply, format_counts
from common.protocol import ModelSpec, StudyProtocol, protocol_from_mapping
from common.selection.terms import assign_folds
from common.site_config import SiteConfig
from common.synthetic import Task
from common.synthetic.write import study_protocol_mapping
from harmonization.combat.design import CombatOptions
from server.orchestrator import run_models
from server.phases.combat import run_combat
from server.phases.prepare import PrepareSummary
from server.study import StudySettings
from tests.server.test_rounds import FakeSites, write_prepared

N_FEATURES = 4
FEATURES = [f"f{j}" for j in range(N_FEATURES)]
WATCHED = "S"
#: A shift of one patient's values (a sum linear in them moves by its weight times the shift,
#: whatever the shift; one that is not, e.g. a sum of squares of ages, by far more than
#: rounding).
SHIFT = 0.5


class Recorder(FakeSites):
    """The sites' real phase code; every request to the watched site and its reply (None for a
    refusal) are kept in order."""

    def __init__(self, sites: dict[int, SiteConfig], protocol: StudyProtocol) -> None:
        super().__init__(sites, protocol)
        self.log: list[tuple[MessageType, RecordDict, RecordDict | None]] = []

    def answer(self, site: SiteConfig, message_type: MessageType, content: RecordDict
               ) -> RecordDict:
        if site.site_name != WATCHED:
            return super().answer(site, message_type, content)
        try:
            reply = super().answer(site, message_type, content)
        except MyeloFedError:
            self.log.append((message_type, content, None))
            raise
        self.log.append((message_type, content, reply))
        return reply


def numbers(reply: RecordDict | None) -> np.ndarray:
    """Every number in a reply, in a fixed order (none for a refusal)."""
    if reply is None:
        return np.zeros(0)
    out: list[float] = []
    for key in sorted(reply):
        record = reply[key]
        if isinstance(record, ArrayRecord):
            for name in sorted(record):
                out += record[name].numpy().astype(float).ravel().tolist()
        elif isinstance(record, ConfigRecord):
            for name in sorted(record):
                value = record[name]
                if isinstance(value, bool | int | float):
                    out.append(float(value))
    return np.asarray(out)


#: The small site's training rows: (patients, scanner, sex, responder, ISS stage). Every
#: scanner, level and their crossings with the label and each other hold 0 or at least 5.
SMALL_SITE = [(5, "s_S", "M", 1, "I"), (4, "s_S", "M", 0, "I"), (4, "s_S", "M", 0, "II"),
              (3, "s_S", "M", 0, "III"), (5, "s_shared", "F", 1, "II"),
              (3, "s_shared", "F", 0, "I"), (3, "s_shared", "F", 0, "III"),
              (3, "s_shared", "M", 0, "II"), (2, "s_shared", "M", 0, "III")]
#: The same site where three of the responders on the shared scanner are women: every scanner
#: and scanner x level still holds 0 or at least 5, but ComBat's ``X'X`` counts the responding
#: women (sex x response, over the site's rows).
LEAKY_SITE = [(5, "s_S", "M", 1, "I"), (4, "s_S", "M", 0, "I"), (4, "s_S", "M", 0, "II"),
              (3, "s_S", "M", 0, "III"), (3, "s_shared", "F", 1, "II"),
              (2, "s_shared", "M", 1, "II"), (3, "s_shared", "F", 0, "I"),
              (2, "s_shared", "F", 0, "III"), (3, "s_shared", "M", 0, "II"),
              (3, "s_shared", "M", 0, "III")]
RESPONDING_WOMEN = (16, 17, 18)  # their rows in LEAKY_SITE's table


def federation(root: Path, protocol: StudyProtocol, atoms: bool,
               small_site: list[tuple[int, str, str, int, str]]
               ) -> tuple[dict[int, SiteConfig], list[PrepareReply]]:
    """Site S (``small_site``: 32 training rows on two scanners, one shared with site B, and 13
    test rows) and two larger sites with every crossing large, their folds made as the
    preparation makes them (``atoms``) or stratified as before."""
    rng = np.random.default_rng(11)
    label = protocol.task.label_column
    columns = ["batch", "sex", label, "iss_stage"]
    small = pd.DataFrame([row for count, *row in small_site for _ in range(count)],
                         columns=columns).assign(split="train")
    tests = pd.DataFrame({"batch": rng.choice(["s_S", "s_shared"], 13),
                          "sex": rng.choice(["F", "M"], 13), label: np.resize([1, 0, 0], 13),
                          "iss_stage": rng.choice(["I", "II", "III"], 13), "split": "test"})
    sites, replies = {}, []
    for node, name in enumerate([WATCHED, "B", "C"]):
        if name == WATCHED:
            frame = pd.concat([small, tests], ignore_index=True)
        else:
            frame = pd.DataFrame({"batch": "s_shared" if name == "B" else "s_C",
                                  "sex": np.resize(["F", "M"], 60),
                                  label: np.resize([1, 0, 0, 1, 0], 60),
                                  "iss_stage": np.resize(["I", "II", "III"], 60),
                                  "split": np.resize(["train"] * 7 + ["test"] * 3, 60)})
        n = len(frame)
        frame.insert(0, "case_id", [f"{name}{i}" for i in range(n)])
        frame["age"] = rng.integers(45, 85, n).astype(float)
        y = frame[label].to_numpy()
        train = (frame.split == "train").to_numpy()
        frame["fold"] = -1
        frame.loc[train, "fold"] = (
            site_folds(frame[train], protocol, node, MIN_ROWS_SENT)
            if atoms else assign_folds(y[train], protocol.model.cv_folds, node, True))
        for j, feature in enumerate(FEATURES):
            frame[feature] = (rng.normal(10, 1, n) + 0.8 * y * (j < 2)
                              + frame.batch.map({"s_shared": 1.0, "s_S": -0.5, "s_C": 0.3}))
        sites[node + 1] = write_prepared(root, name, protocol, frame)
        rows = frame[train]
        replies.append(PrepareReply(name, "ok", n_train=len(rows), n_test=n - len(rows),
                                    batches=format_counts(rows.batch.value_counts().items()),
                                    n_features=N_FEATURES, feature_names=tuple(FEATURES)))
    return sites, replies


@pytest.fixture(autouse=True)
def no_site_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The site's own report (plots written after each evaluation) stays at the site and takes
    most of a replay's time: not written here."""
    monkeypatch.setattr(validation, "record_evaluation", lambda *args, **kwargs: None)


@pytest.fixture()
def protocol() -> StudyProtocol:
    """The response study's protocol (ComBat protecting the response, sex and age; ISS stage and
    age in the nomogram), a quick model, DeLong's CI only."""
    response = protocol_from_mapping(study_protocol_mapping(Task.RESPONSE, "MR"))
    return response.model_copy(update={
        "model": ModelSpec(screening_top_k=3, cv_folds=5, n_lambdas=3,
                           clinical=("iss_stage", "age")),
        "covariates": response.covariates.model_copy(update={"harmonize": ("age", "sex")}),
        "validation": response.validation.model_copy(update={"bootstrap": 0})})


def run_study(root: Path, protocol: StudyProtocol, atoms: bool,
              small_site: list[tuple[int, str, str, int, str]]
              ) -> tuple[Recorder, SiteConfig, dict]:
    """ComBat, both radiomics passes and the nomogram, as the orchestrator runs them."""
    sites, replies = federation(root / "sites", protocol, atoms, small_site)
    settings = StudySettings(protocol, root / "study",
                             combat=CombatOptions(min_batch_size=8, min_cell=MIN_ROWS_SENT))
    settings.out_dir.mkdir()
    transport = Recorder(sites, protocol)
    nodes = {n: s.site_name for n, s in sites.items()}
    failed = run_combat(transport, nodes, replies, settings)
    run_models(transport, nodes, {n: s for n, s in nodes.items() if s not in failed},
               PrepareSummary(replies, {}, True, ""), settings, lambda _: None)
    outcome = {p.stem: p.read_text() for p in settings.out_dir.glob("*.json")}
    return transport, sites[1], outcome


def replay(site: SiteConfig, protocol: StudyProtocol, folder: Path,
           change: Callable[[pd.DataFrame], pd.DataFrame],
           log: list[tuple[MessageType, RecordDict, RecordDict | None]]) -> list[np.ndarray]:
    """The numbers a copy of ``site`` (its prepared table changed by ``change``, its release
    ledger started afresh) sends in answer to the same requests, in order."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(site.work_dir, folder)
    copy = site.model_copy(update={"work_dir": folder, "manifest": folder / "manifest.csv"})
    study = study_dir(copy, protocol)
    for stale in study.iterdir():
        if stale.name != PREPARED_FILE and stale.is_file():
            stale.unlink()
    table = pd.read_parquet(study / PREPARED_FILE)
    change(table).to_parquet(study / PREPARED_FILE)
    answering = FakeSites({1: copy}, protocol)
    out = []
    for message_type, content, _ in log:
        try:
            out.append(numbers(answering.answer(copy, message_type, content)))
        except MyeloFedError:
            out.append(np.zeros(0))
    return out


def shifted(rows: dict[int, float]) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The table with each of ``rows`` (positions) shifted by its amount in every feature and in
    age."""
    def change(table: pd.DataFrame) -> pd.DataFrame:
        table = table.copy()
        for i, amount in rows.items():
            table.loc[table.index[i], [*FEATURES, "age"]] += amount
        return table
    return change


def duplicated(rows: list[int]) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The table with a copy of each of ``rows`` (positions; a new case id, the same fold,
    split and values)."""
    def change(table: pd.DataFrame) -> pd.DataFrame:
        copies = table.iloc[rows].copy()
        copies["case_id"] = [f"copy{k}" for k in range(len(rows))]
        return pd.concat([table, copies], ignore_index=True)
    return change


def weight_rows(site: SiteConfig, protocol: StudyProtocol, tmp: Path, recorder: Recorder
                ) -> tuple[np.ndarray, np.ndarray]:
    """What each released number weighs each of the site's patients by: for the numbers linear
    in the patients' values (from shifting one patient at a time), and for the numbers no value
    moves (from copying one patient at a time). Rows: numbers; columns: patients."""
    base = np.concatenate([numbers(reply) for *_, reply in recorder.log])
    sizes = [len(numbers(reply)) for *_, reply in recorder.log]

    def sent(change: Callable[[pd.DataFrame], pd.DataFrame]) -> np.ndarray:
        got = replay(site, protocol, tmp, change, recorder.log)
        assert [len(g) for g in got] == sizes, "a replay answered in another shape"
        return np.concatenate(got)

    n = len(pd.read_parquet(study_dir(site, protocol) / PREPARED_FILE))
    amounts = np.random.default_rng(0).uniform(0.5, 1.5, n)
    once = sent(shifted({i: SHIFT * a for i, a in enumerate(amounts)})) - base
    twice = sent(shifted({i: 2 * SHIFT * a for i, a in enumerate(amounts)})) - base
    scale = np.abs(base) + 1.0
    moved = np.abs(once) > 1e-9 * scale
    linear = moved & (np.abs(twice - 2 * once) <= 1e-9 * scale)
    by_value = np.column_stack([sent(shifted({i: SHIFT})) - base for i in range(n)])
    by_count = np.column_stack([sent(duplicated([i])) - base for i in range(n)])
    # a count is a sum over the patients: copying all of them adds each one's part
    counted = (~moved & (np.abs(twice) <= 1e-9 * scale)
               & (np.abs(sent(duplicated(list(range(n)))) - base - by_count.sum(axis=1))
                  <= 1e-9 * scale))
    return by_value[linear] / SHIFT, by_count[counted]


def row_basis(w: np.ndarray) -> np.ndarray:
    """An orthonormal basis (rows) of the row space of ``w``."""
    if not w.size:
        return np.zeros((0, w.shape[1]))
    _, s, vt = np.linalg.svd(w, full_matrices=False)
    return vt[: int(np.sum(s > 1e-8 * np.abs(w).max()))]


def carries(basis: np.ndarray, group: tuple[int, ...]) -> bool:
    """Whether a nonzero vector of the span is supported within ``group`` (dropping the
    group's columns lowers the rank)."""
    return np.linalg.matrix_rank(np.delete(basis, group, axis=1), tol=1e-8) < len(basis)


def smallest_group(w: np.ndarray, minimum: int) -> tuple[int, ...] | None:
    """The smallest group of 1 to ``minimum - 1`` patients (columns) that a vector in the row
    space of ``w`` is supported on, or None. Patients whose columns are equal are weighed alike
    by every vector of the span, so the groups tried are unions of such cells."""
    basis = row_basis(w)
    if not len(basis):
        return None
    rounded = np.round(w / np.abs(w).max(), 6)
    cells: dict[bytes, list[int]] = {}
    for i in range(w.shape[1]):
        cells.setdefault(rounded[:, i].tobytes(), []).append(i)
    small = [tuple(c) for c in cells.values() if len(c) < minimum]
    groups = sorted({tuple(sorted(i for cell in chosen for i in cell))
                     for size in range(1, minimum) for chosen in combinations(small, size)
                     if sum(map(len, chosen)) < minimum}, key=lambda g: (len(g), g))
    return next((g for g in groups if carries(basis, g)), None)


@pytest.mark.slow
def test_before_atoms_and_the_ledger_the_search_finds_a_patient_and_a_small_count(
        tmp_path: Path, protocol: StudyProtocol, monkeypatch: pytest.MonkeyPatch):
    """The search can fail: on what the site sent before atoms and the ledger (stratified
    folds, every release let through), the span of its model's first-round sums holds the
    feature sum of a fold's two responders, and ComBat's ``X'X`` counts the three responding
    women."""
    monkeypatch.setattr(radiomics, "release", lambda *args, **kwargs: None)
    monkeypatch.setattr(combat, "release", lambda *args, **kwargs: None)
    recorder, site, _ = run_study(tmp_path, protocol, False, LEAKY_SITE)
    by_value, by_count = weight_rows(site, protocol, tmp_path / "replay", recorder)
    for found in (by_value, by_count):  # the folds' sums by label: 2 responders a fold
        group = smallest_group(found, MIN_ROWS_SENT)
        assert group is not None and len(group) < MIN_ROWS_SENT
    assert carries(row_basis(by_count), RESPONDING_WOMEN)


def test_the_ledger_keeps_a_crossing_of_two_covariates_from_leaving(
        tmp_path: Path, protocol: StudyProtocol):
    """With the ledger on, the same site refuses ComBat's design moments (the crossing of sex
    and response holds three patients), and ComBat goes on without it and its scanners."""
    sites, replies = federation(tmp_path / "sites", protocol, True, LEAKY_SITE)
    settings = StudySettings(protocol, tmp_path / "study",
                             combat=CombatOptions(min_batch_size=8, min_cell=MIN_ROWS_SENT))
    settings.out_dir.mkdir()
    failed = run_combat(FakeSites(sites, protocol), {n: s.site_name for n, s in sites.items()},
                        replies, settings)
    assert set(failed) == {WATCHED}
    assert "ReleaseRefused: ComBat's design moments" in failed[WATCHED]
    report = json.loads((settings.out_dir / "combat.json").read_text())
    assert report["batches"] == ["s_C", "s_shared"]
    assert set(report["harmonized_rows"]) == {"B", "C"}


@pytest.mark.slow
def test_a_whole_study_at_a_small_site_isolates_no_group_under_the_minimum(
        tmp_path: Path, protocol: StudyProtocol):
    """Every phase at the small site: no sum of values or count the coordinator can compute from
    all its replies covers fewer than the minimum number of patients."""
    recorder, site, outcome = run_study(tmp_path, protocol, True, SMALL_SITE)
    kinds = {t for t, _, reply in recorder.log if reply is not None}
    assert kinds == {MessageType.COMBAT_DESIGN, MessageType.COMBAT_RESIDUALS,
                     MessageType.COMBAT_MOMENTS, MessageType.COVBAT_PRODUCTS,
                     MessageType.COMBAT_APPLY,
                     MessageType.MODEL_SUMMARY, MessageType.MODEL_TERMS,
                     MessageType.MODEL_EVALUATE}
    assert all(reply is not None for *_, reply in recorder.log)  # the site refused nothing
    nomogram = json.loads(outcome["nomogram"])
    assert nomogram["status"] == "done" and WATCHED in nomogram["training_sets"]["federated"][
        "sites"]
    by_value, by_count = weight_rows(site, protocol, tmp_path / "replay", recorder)
    assert by_value.shape[0] > 100 and by_count.shape[0] > 100  # what was searched
    assert smallest_group(by_value, MIN_ROWS_SENT) is None
    assert smallest_group(by_count, MIN_ROWS_SENT) is None
