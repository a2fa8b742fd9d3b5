"""Privacy against differencing (issue 22), played by a curious coordinator: it runs the
radiomics phase and the nomogram through the sites' real code, keeps every reply of a small site
(28 training rows, 8 of them positive, 5 folds, 3 patients at ISS stage III) and subtracts what it
can.

Before atoms, the site's stratified folds put a single positive in some folds; the fit without
such a fold and the fit on all rows start from the same intercept-only coefficients, so their
difference gives that patient's exact feature values. The nomogram's first request (all
coefficients zero) gives the count, responders and age sum of each ISS stage. With the folds
built from atoms and the release ledger on, no combination of the replies is a sum over fewer
than the minimum, and the nomogram goes on without the site that cannot send its terms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import RecordDict

import client.phases.radiomics as radiomics
from client.folds import site_folds
from client.workspace import PREPARED_FILE, study_dir
from common.messages import MessageType, ModelTermsRequest
from common.payloads import MIN_ROWS_SENT, clinical_columns
from common.protocol import ModelSpec, StudyProtocol, protocol_from_mapping
from common.records import unpack, unpack_request
from common.selection.terms import BatchTerms, assign_folds
from common.site_config import SiteConfig
from common.synthetic import Task
from common.synthetic.write import study_protocol_mapping
from server.phases.nomogram import run_nomogram
from server.phases.radiomics import run_model
from server.study import StudySettings, StudyStopped
from tests.server.test_rounds import FakeSites, write_prepared
from tests.server.test_span_search import smallest_group

N_FEATURES = 5


class Eavesdropper(FakeSites):
    """The sites' real phase code, and a coordinator that keeps every model-terms request and
    reply of one site."""

    def __init__(self, sites: dict[int, SiteConfig], protocol: StudyProtocol, watched: str):
        super().__init__(sites, protocol)
        self.watched = watched
        self.kept: list[tuple[ModelTermsRequest, BatchTerms]] = []

    def answer(self, site: SiteConfig, message_type: MessageType, content: RecordDict
               ) -> RecordDict:
        reply = super().answer(site, message_type, content)
        if site.site_name == self.watched and message_type is MessageType.MODEL_TERMS:
            self.kept.append((unpack_request(content, ModelTermsRequest),
                              unpack(reply, "terms", BatchTerms)))
        return reply

    def radiomics_replies(self) -> list[tuple[ModelTermsRequest, BatchTerms]]:
        return [(r, t) for r, t in self.kept if not r.radiomics]

    def nomogram_replies(self) -> list[tuple[ModelTermsRequest, BatchTerms]]:
        return [(r, t) for r, t in self.kept if r.radiomics]


def small_federation(root: Path, protocol: StudyProtocol, atoms: bool
                     ) -> tuple[dict[int, SiteConfig], list[str]]:
    """Site S (40 patients, 28 training rows of which 8 positive; 3 negatives at ISS stage III)
    and two larger sites (every ISS stage x label cell of 5 or more), their folds made as the
    preparation makes them now (``atoms``) or as it did before (stratified)."""
    rng = np.random.default_rng(3)
    label = protocol.task.label_column
    sites = {}
    for node, (name, n, positives) in enumerate([("S", 40, 12), ("B", 60, 24), ("C", 60, 24)]):
        y = np.zeros(n, dtype=int)
        y[:positives] = 1
        frame = pd.DataFrame({"case_id": [f"{name}{i}" for i in range(n)],
                              "batch": f"scanner_{name}", label: y})
        test = np.r_[np.arange(positives)[: positives // 3],
                     np.arange(positives, n)[: (n - positives) * 3 // 10]]
        frame["split"] = np.where(np.isin(np.arange(n), test), "test", "train")
        train = (frame.split == "train").to_numpy()
        frame["age"] = rng.integers(45, 85, n).astype(float)
        frame["sex"] = rng.choice(["F", "M"], n)
        stage = np.empty(n, dtype=object)
        for part in (y == 0, y == 1):  # each label's rows over the stages in turn
            stage[part] = np.resize(["I", "II", "III"], part.sum())
        if name == "S":  # III: three negatives of the training rows, none among the positives
            negatives = np.flatnonzero(train & (y == 0))
            stage[train & (stage == "III")] = "II"
            stage[negatives[:3]] = "III"
            stage[~train & (stage == "III")] = "I"
        frame["iss_stage"] = stage
        frame["fold"] = -1
        frame.loc[train, "fold"] = (
            site_folds(frame[train], protocol, node, MIN_ROWS_SENT)
            if atoms else assign_folds(y[train], 5, node, True))
        for j in range(N_FEATURES):
            frame[f"f{j}"] = rng.normal(10, 1, n) + 0.8 * y * (j < 2)
        sites[node + 1] = write_prepared(root, name, protocol, frame)
    return sites, [f"f{j}" for j in range(N_FEATURES)]


def differencing_attack(kept: list[tuple[ModelTermsRequest, BatchTerms]]
                        ) -> list[tuple[int, np.ndarray]]:
    """Every group of 1 to MIN_ROWS_SENT - 1 patients of one class whose feature sum the
    coordinator gets by subtracting two fits of the same training set that the site stepped at
    the same intercept-only coefficients (a first round), with the group's size. The standardized
    sums are mapped back to feature values through the request's mean and sd."""
    fits = []
    for request, terms in kept:
        r = request.request
        for j in range(len(r.beta)):
            if np.all(r.beta[j, 1:] == 0):
                t = int(r.fit_set[j])
                fits.append((t, r.beta[j, 0], terms.gradient[j], terms.hessian[j],
                             r.mean[t], r.sd[t]))
    found = []
    for a, (t, b0, g1, h1, mean, sd) in enumerate(fits):
        for t2, b2, g2, h2, _, _ in fits[a + 1:]:
            if t2 != t or b2 != b0:
                continue
            p = 1.0 / (1.0 + np.exp(-b0))
            g, h = g1 - g2, h1 - h2
            n = h[0, 0] / (p * (1 - p))  # rows in one fit and not the other
            z_sum = h[0, 1:] / (p * (1 - p))
            n_pos, z_pos = p * n - g[0], p * z_sum - g[1:]
            for count, z in ((n_pos, z_pos), (n - n_pos, z_sum - z_pos)):
                count = round(abs(float(count)))
                if 1 <= count < MIN_ROWS_SENT:
                    found.append((count, np.sign(n) * z / count * sd + mean))
    return found


@pytest.fixture()
def protocol() -> StudyProtocol:
    """The response study's protocol (ISS stage and age in the nomogram), a quick model."""
    response = protocol_from_mapping(study_protocol_mapping(Task.RESPONSE, "MR"))
    return response.model_copy(update={"model": ModelSpec(
        screening_top_k=3, cv_folds=5, n_lambdas=3, clinical=("iss_stage", "age"))})


def _run(tmp_path: Path, protocol: StudyProtocol, atoms: bool
         ) -> tuple[Eavesdropper, dict, list[str], dict[int, SiteConfig]]:
    """The radiomics model, then the nomogram; the nomogram's report under "nomogram"."""
    sites, names = small_federation(tmp_path / "sites", protocol, atoms)
    settings = StudySettings(protocol, tmp_path / "study")
    settings.out_dir.mkdir()
    transport = Eavesdropper(sites, protocol, "S")
    nodes = {n: s.site_name for n, s in sites.items()}
    models, sets, report = run_model(transport, nodes, names, settings, False)
    prevalence = {n: t["prevalence"] for n, t in report["training_sets"].items()}
    report["nomogram"] = run_nomogram(transport, nodes, settings, models, sets, prevalence,
                                      False, lambda _: None)
    return transport, report, names, sites


def stage_attack(kept: list[tuple[ModelTermsRequest, BatchTerms]], protocol: StudyProtocol
                 ) -> list[tuple[str, int, float]]:
    """From the nomogram's first request (every coefficient zero, so every patient weighs 1/4 in
    the Hessian and 1/2 - label in the gradient): each clinical level's patients, with their
    age sum, where they are 1 to MIN_ROWS_SENT - 1."""
    terms = ["score", *[f"{c}={v}" for c, v in clinical_columns(protocol)]]
    found = []
    for request, reply in kept:
        r = request.request
        for j in np.flatnonzero(np.all(r.beta == 0, axis=1)):
            h = reply.hessian[j]
            for k, term in enumerate(terms):
                if "=" not in term:
                    continue
                count = round(h[0, 1 + k] / 0.25)
                if 1 <= count < MIN_ROWS_SENT:
                    found.append((term, count, h[1 + terms.index("age=None"), 1 + k] / 0.25
                                  if "age=None" in terms else np.nan))
    return found


def test_before_atoms_one_patients_features_come_out_of_two_replies(
        tmp_path: Path, protocol: StudyProtocol, monkeypatch: pytest.MonkeyPatch):
    """The attack works on what the sites sent before this change (stratified folds, no
    ledger): one patient's exact feature values."""
    monkeypatch.setattr(radiomics, "release", lambda *args, **kwargs: None)
    transport, report, names, sites = _run(tmp_path, protocol, atoms=False)
    assert report["failed"] == {}
    found = differencing_attack(transport.radiomics_replies())
    singles = [values for count, values in found if count == 1]
    assert singles, "the attack found no single patient"
    table = pd.read_parquet(study_dir(sites[1], protocol) / PREPARED_FILE)
    rows = table.loc[table.split == "train", names].to_numpy(float)
    features = transport.radiomics_replies()[0][0].request.features[0]
    errors = [np.min(np.abs(rows[:, features] - v).max(axis=1)) for v in singles]
    assert min(errors) < 1e-8  # a training patient's values, exactly
    # the nomogram's first request: the three patients at ISS stage III and their age sum
    assert report["nomogram"]["status"] == "done" and report["nomogram"]["left_out"] == {}
    train = table[table.split == "train"]
    stage_three = train[train.iss_stage == "III"]
    assert ("iss_stage=III", 3, pytest.approx(stage_three.age.sum())) in \
        stage_attack(transport.nomogram_replies(), protocol)


def test_the_ledger_withholds_the_differencing_replies(tmp_path: Path, protocol: StudyProtocol):
    """The same folds with the ledger on: every site whose folds split a class into cells under
    the minimum (all three here: 3 or 4 positives a fold) refuses its terms, and the coordinator
    is told why; nothing can be subtracted."""
    sites, names = small_federation(tmp_path / "sites", protocol, atoms=False)
    settings = StudySettings(protocol, tmp_path / "study")
    settings.out_dir.mkdir()
    transport = Eavesdropper(sites, protocol, "S")
    with pytest.raises(StudyStopped) as stopped:
        run_model(transport, {n: s.site_name for n, s in sites.items()}, names, settings, False)
    assert str(stopped.value).count("ReleaseRefused") == 3
    assert "a sum over fewer than 5 patients" in str(stopped.value)
    assert differencing_attack(transport.radiomics_replies()) == []


def test_with_atoms_no_group_under_the_minimum_can_be_isolated(
        tmp_path: Path, protocol: StudyProtocol):
    """Folds from atoms, the ledger on: the study runs at every site, the attack finds nothing,
    and no vector in the span of the weights behind the site's first-round sums is supported on
    fewer than the minimum number of patients."""
    transport, report, names, sites = _run(tmp_path, protocol, atoms=True)
    assert report["failed"] == {}
    replies = transport.radiomics_replies()
    assert replies and differencing_attack(replies) == []
    # the nomogram: the site refuses terms over its three ISS III patients and the fits go on
    # without it; it still scores the nomograms on its test rows
    nomogram = report["nomogram"]
    assert nomogram["status"] == "done" and set(nomogram["left_out"]) == {"S"}
    assert "ReleaseRefused: the nomogram's terms" in nomogram["left_out"]["S"]
    assert nomogram["training_sets"]["federated"]["sites"] == ["B", "C"]
    assert set(nomogram["sites"]) == {"S", "B", "C"}
    assert stage_attack(transport.nomogram_replies(), protocol) == []
    table = pd.read_parquet(study_dir(sites[1], protocol) / PREPARED_FILE)
    train = table[table.split == "train"]
    y, folds = train[protocol.task.label_column].to_numpy(float), train.fold.to_numpy()
    weights = []  # what each first-round gradient and Hessian row weights each patient by
    for request, _ in transport.radiomics_replies():
        r = request.request
        for j in np.flatnonzero(np.all(r.beta[:, 1:] == 0, axis=1)):
            p = 1.0 / (1.0 + np.exp(-r.beta[j, 0]))
            inside = (folds != r.fit_fold[j]).astype(float)
            weights += [inside * (p - y), inside * p * (1 - p)]
    assert weights and smallest_group(np.array(weights), MIN_ROWS_SENT) is None
