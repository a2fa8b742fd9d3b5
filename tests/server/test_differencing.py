"""Privacy against differencing (issue 22), played by a curious coordinator: it runs the
radiomics phase through the sites' real code, keeps every reply of a small site (28 training
rows, 8 of them positive, 5 folds) and subtracts what it can.

Before atoms, the site's stratified folds put a single positive in some folds; the fit without
such a fold and the fit on all rows start from the same intercept-only coefficients, so their
difference gives that patient's exact feature values. With the folds built from atoms and the
release ledger on, no combination of the replies is a sum over fewer than the minimum.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import RecordDict

import client.phases.radiomics as radiomics
from client.workspace import PREPARED_FILE, study_dir
from common.messages import MessageType, ModelTermsRequest
from common.payloads import MIN_ROWS_SENT
from common.protocol import ModelSpec, StudyProtocol, load_protocol
from common.records import unpack, unpack_request
from common.selection.terms import BatchTerms, assign_folds
from common.site_config import SiteConfig
from server.phases.radiomics import run_model
from server.study import StudySettings, StudyStopped
from tests.server.test_rounds import FakeSites

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


def small_federation(root: Path, protocol: StudyProtocol, atoms: bool
                     ) -> tuple[dict[int, SiteConfig], list[str]]:
    """Site S (40 patients, 28 training rows of which 8 positive) and two larger sites, their
    folds made as the preparation makes them now (``atoms``) or as it did before (stratified)."""
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
        frame["fold"] = -1
        frame.loc[train, "fold"] = (
            assign_folds(y[train], 5, node, True, MIN_ROWS_SENT, frame.batch.to_numpy()[train])
            if atoms else assign_folds(y[train], 5, node, True))
        for j in range(N_FEATURES):
            frame[f"f{j}"] = rng.normal(10, 1, n) + 0.8 * y * (j < 2)
        site = SiteConfig(site_name=name, manifest=root / name / "manifest.csv",
                          work_dir=root / name)
        path = study_dir(site, protocol) / PREPARED_FILE
        path.parent.mkdir(parents=True)
        frame.to_parquet(path)
        sites[node + 1] = site
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
    return load_protocol("preset:spine_mri_t1w").model_copy(update={
        "model": ModelSpec(screening_top_k=3, cv_folds=5, n_lambdas=3)})


def _run(tmp_path: Path, protocol: StudyProtocol, atoms: bool
         ) -> tuple[Eavesdropper, dict, list[str], dict[int, SiteConfig]]:
    sites, names = small_federation(tmp_path / "sites", protocol, atoms)
    settings = StudySettings(protocol, tmp_path / "study")
    settings.out_dir.mkdir()
    transport = Eavesdropper(sites, protocol, "S")
    nodes = {n: s.site_name for n, s in sites.items()}
    _, _, report = run_model(transport, nodes, names, settings, False)
    return transport, report, names, sites


def test_before_atoms_one_patients_features_come_out_of_two_replies(
        tmp_path: Path, protocol: StudyProtocol, monkeypatch: pytest.MonkeyPatch):
    """The attack works on what the sites sent before this change (stratified folds, no
    ledger): one patient's exact feature values."""
    monkeypatch.setattr(radiomics, "release", lambda *args, **kwargs: None)
    transport, report, names, sites = _run(tmp_path, protocol, atoms=False)
    assert report["failed"] == {}
    found = differencing_attack(transport.kept)
    singles = [values for count, values in found if count == 1]
    assert singles, "the attack found no single patient"
    table = pd.read_parquet(study_dir(sites[1], protocol) / PREPARED_FILE)
    rows = table.loc[table.split == "train", names].to_numpy(float)
    features = transport.kept[0][0].request.features[0]
    errors = [np.min(np.abs(rows[:, features] - v).max(axis=1)) for v in singles]
    assert min(errors) < 1e-8  # a training patient's values, exactly


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
    assert differencing_attack(transport.kept) == []


def test_with_atoms_no_group_under_the_minimum_can_be_isolated(
        tmp_path: Path, protocol: StudyProtocol):
    """Folds from atoms, the ledger on: the study runs at every site, the attack finds nothing,
    and no vector in the span of the weights behind the site's first-round sums is supported on
    fewer than the minimum number of patients."""
    transport, report, names, sites = _run(tmp_path, protocol, atoms=True)
    assert report["failed"] == {}
    assert transport.kept and differencing_attack(transport.kept) == []
    table = pd.read_parquet(study_dir(sites[1], protocol) / PREPARED_FILE)
    train = table[table.split == "train"]
    y, folds = train[protocol.task.label_column].to_numpy(float), train.fold.to_numpy()
    weights = []  # what each first-round gradient and Hessian row weights each patient by
    for request, _ in transport.kept:
        r = request.request
        for j in np.flatnonzero(np.all(r.beta[:, 1:] == 0, axis=1)):
            p = 1.0 / (1.0 + np.exp(-r.beta[j, 0]))
            inside = (folds != r.fit_fold[j]).astype(float)
            weights += [inside * (p - y), inside * p * (1 - p)]
    assert weights and smallest_isolable(np.array(weights), MIN_ROWS_SENT) is None


def smallest_isolable(w: np.ndarray, minimum: int) -> int | None:
    """The size of the smallest group of 1 to ``minimum - 1`` columns (patients) that a vector in
    the row space of ``w`` can be supported on, or None. Exhaustive over groups of patients whose
    columns are not identical to another's outside the group (a brute force independent of the
    ledger's cell bookkeeping)."""
    full = np.linalg.matrix_rank(w)
    n = w.shape[1]
    for size in range(1, minimum):
        for group in combinations(range(n), size):
            if np.linalg.matrix_rank(np.delete(w, group, axis=1)) < full:
                return size
    return None
