"""The server's round mechanics (server/rounds.py) and the phases driven through a fake transport:
the orchestration without Flower, with the sites' real phase code.

Longer than 400 lines: every phase is driven through the one fake transport defined here."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from flwr.app import RecordDict

from client.app import SITE_REFUSED, refusal
from client.phases import combat, radiomics, validation
from client.report import report_dir
from client.workspace import HARMONIZED_FILE, PREPARED_FILE, study_dir
from common.errors import MyeloFedError
from common.glm import FeatureMoments
from common.messages import EvaluateRequest, MessageType, ModelTermsRequest, StudyRequest
from common.payloads import MIN_ROWS_SENT, PrepareReply, format_counts
from common.protocol import (
    CovbatSpec,
    HarmonizationSpec,
    ModelSpec,
    StudyProtocol,
    load_protocol,
)
from common.records import pack, unpack_request
from common.selection.pooled import fit_pooled
from common.selection.terms import assign_folds
from common.selection.updating import candidates
from common.site_config import SiteConfig
from harmonization.combat.design import CombatOptions
from harmonization.combat.model import SiteTable, fit_combat
from harmonization.covbat import fit_covbat
from harmonization.messages import CombatRequest
from server.phases.combat import combat_design, run_combat
from server.phases.radiomics import run_model
from server.rounds import Reply, collect, exchange, unanswered, wait_for_nodes
from server.study import StudySettings


def test_a_malformed_reply_excludes_that_site_by_name_and_keeps_the_others():
    good = FeatureMoments(20, np.zeros(4), np.ones(4))
    wrong_shape = FeatureMoments(20, np.zeros(5), np.ones(5))
    poisoned = FeatureMoments(20, np.full(4, np.nan), np.ones(4))
    # collect reads only a reply's content: a stand-in for Flower's Message does
    replies = {site: SimpleNamespace(content=pack(moments=payload))
               for site, payload in (("A", good), ("B", wrong_shape), ("C", poisoned))}
    failed: dict[str, str] = {}
    kept = collect(replies, failed, "moments", FeatureMoments, {"mean": (4,), "m2": (4,)})
    assert list(kept) == ["A"]
    assert "'mean' has shape (5,), expected (4,)" in failed["B"]
    assert "'mean' holds NaN" in failed["C"]


def test_flowers_errors_for_silent_nodes_are_given_to_the_silent_sites():
    lost = "error 5: Node Unavailable"
    assert unanswered({"C"}, [lost], 60) == [("C", lost)]
    assert unanswered({"B", "C"}, [], 60) == [("B", "no reply within 60 s"),
                                               ("C", "no reply within 60 s")]
    # two silent sites, one error from Flower: which is which is unknown, both are told
    assert unanswered({"B", "C"}, [lost], 60) == [
        ("B", f"no reply within 60 s ({lost})"), ("C", f"no reply within 60 s ({lost})")]


# --- the phases over a fake transport: the server's orchestration without Flower ----------------

class FakeSites:
    """A :class:`server.rounds.Transport` whose nodes answer with the site's real phase code
    (``client.phases``) on prepared tables in a folder, or fail as told."""

    def __init__(self, sites: dict[int, SiteConfig], protocol: StudyProtocol,
                 fail: dict[tuple[int, MessageType], str] | None = None,
                 silent: set[tuple[int, MessageType]] | None = None) -> None:
        self.sites, self.protocol = sites, protocol
        self.fail, self.silent = fail or {}, silent or set()
        self.sent: list[tuple[MessageType, int]] = []

    def node_ids(self) -> list[int]:
        return sorted(self.sites)

    def send_and_receive(self, message_type: MessageType, contents: dict[int, RecordDict],
                         timeout_s: float) -> list[Reply]:
        out = []
        for node, content in contents.items():
            self.sent.append((message_type, node))
            if (node, message_type) in self.silent:
                continue
            if (node, message_type) in self.fail:
                out.append(Reply(node, error=self.fail[(node, message_type)]))
                continue
            try:
                out.append(Reply(node, self.answer(self.sites[node], message_type, content)))
            except MyeloFedError as exc:  # as client/app.py's handlers answer a refusal
                out.append(Reply(node, error=f"error {SITE_REFUSED}: {refusal(exc)}"))
        return out

    def answer(self, site: SiteConfig, message_type: MessageType, content: RecordDict
               ) -> RecordDict:
        """What ``client/app.py``'s handler of ``message_type`` answers, without Flower."""
        if message_type is MessageType.MODEL_SUMMARY:
            study = unpack_request(content, StudyRequest).study
            moments, local = radiomics.model_summary(site, self.protocol, bool(study.harmonized))
            return pack(moments=moments, **({"local": local} if local is not None else {}))
        if message_type is MessageType.MODEL_TERMS:
            terms = unpack_request(content, ModelTermsRequest)
            return pack(terms=radiomics.model_terms(site, self.protocol, terms))
        if message_type is MessageType.MODEL_EVALUATE:
            evaluate = unpack_request(content, EvaluateRequest)
            return pack(metrics=validation.evaluate_request(site, self.protocol, evaluate))
        request = unpack_request(content, CombatRequest)
        if message_type is MessageType.COMBAT_DESIGN:
            return pack(moments=combat.design_moments(site, self.protocol, request))
        if message_type is MessageType.COMBAT_RESIDUALS:
            return pack(residuals=combat.residual_moments(site, self.protocol, request))
        if message_type is MessageType.COMBAT_MOMENTS:
            return pack(moments=combat.shared_moments(site, self.protocol, request))
        if message_type is MessageType.COVBAT_PRODUCTS:
            return pack(products=combat.residual_products(site, self.protocol, request))
        return pack(result=combat.apply(site, self.protocol, request))


def write_prepared(root: Path, name: str, protocol: StudyProtocol, frame: pd.DataFrame
                   ) -> SiteConfig:
    """Site ``name`` under ``root`` with ``frame`` as its prepared table."""
    site = SiteConfig(site_name=name, manifest=root / name / "manifest.csv", work_dir=root / name)
    path = study_dir(site, protocol) / PREPARED_FILE
    path.parent.mkdir(parents=True)
    frame.to_parquet(path)
    return site


def prepared_sites(root: Path, protocol: StudyProtocol, seed: int = 0
                   ) -> tuple[dict[int, SiteConfig], list[PrepareReply]]:
    """Three sites' prepared tables (scanner s2 at two sites), as the preparation writes them."""
    rng = np.random.default_rng(seed)
    label = protocol.task.label_column
    sites, replies = {}, []
    for node, (name, scanners) in enumerate([("A", ["s1", "s2"]), ("B", ["s2"]), ("C", ["s3"])]):
        n = 24 * len(scanners)
        batch = np.repeat(scanners, 24)
        frame = pd.DataFrame({
            "case_id": [f"{name}{i}" for i in range(n)], "batch": batch,
            label: np.tile([0, 1], n // 2), "sex": np.resize(["F", "F", "M", "M"], n),
            "age": rng.normal(60, 8, n).round(),
            "split": np.where(np.arange(n) % 4 == 3, "test", "train")})
        train = (frame.split == "train").to_numpy()
        frame["fold"] = -1  # folds of atoms, as the preparation makes them
        frame.loc[train, "fold"] = assign_folds(frame[label].to_numpy()[train], 3, node, True,
                                                MIN_ROWS_SENT, [batch[train]])
        shift = {"s1": 0.0, "s2": 2.0, "s3": -1.5}
        for j in range(5):
            frame[f"f{j}"] = (rng.normal(10, 1, n) + frame[label] * 0.7
                              + [shift[b] * (j + 1) for b in batch])
        sites[node + 1] = write_prepared(root, name, protocol, frame)
        train = frame[frame.split == "train"]
        replies.append(PrepareReply(name, "ok", n_train=len(train), n_test=n - len(train),
                                    batches=format_counts(train.batch.value_counts().items()),
                                    n_features=5, feature_names=tuple(f"f{j}" for j in range(5))))
    return sites, replies


def pooled_rows(sites: Iterable[SiteConfig], protocol: StudyProtocol) -> SiteTable:
    """Every site's training rows in one table: centralized harmonization's input."""
    tables = [combat.combat_inputs(site, protocol) for site in sites]
    return SiteTable("all", np.vstack([y for y, *_ in tables]),
                     [b for _, batch, *_ in tables for b in batch],
                     {c: [v for *_, cov, _ in tables for v in cov[c]] for c in tables[0][2]})


def test_federated_combat_through_the_phases_equals_the_centralized_fit(tmp_path: Path):
    protocol = load_protocol("preset:spine_mri_t1w").model_copy(update={
        "harmonization": HarmonizationSpec()})  # ComBat alone
    sites, kept = prepared_sites(tmp_path / "sites", protocol)
    settings = StudySettings(protocol, tmp_path / "study",
                             combat=CombatOptions(min_batch_size=8, min_cell=3))
    settings.out_dir.mkdir()
    transport = FakeSites(sites, protocol)
    nodes = {n: s.site_name for n, s in sites.items()}
    failed = run_combat(transport, nodes, kept, settings)
    assert failed == {}
    # the rounds: the shared scanner s2 (sites A and B) makes round 3 necessary
    assert [t for t, _ in transport.sent[::3]] == [
        MessageType.COMBAT_DESIGN, MessageType.COMBAT_RESIDUALS, MessageType.COMBAT_MOMENTS,
        MessageType.COMBAT_APPLY]
    design, _ = combat_design(protocol, kept)
    central = fit_combat([pooled_rows(sites.values(), protocol)], design, settings.combat)
    for site in sites.values():
        y, batch, covariates, _ = combat.combat_inputs(site, protocol, split=None)
        got = pd.read_parquet(study_dir(site, protocol) / HARMONIZED_FILE)
        expected = central.transform(y, batch, covariates)
        np.testing.assert_allclose(got[[f"f{j}" for j in range(5)]].to_numpy(), expected,
                                   rtol=1e-9, atol=1e-9)
    # the scanner diagnostic: site A's two scanners differ in every feature before, in none
    # after; the one-scanner sites measure nothing
    diagnostic = json.loads((settings.out_dir / "combat.json").read_text())["scanner_features"]
    assert diagnostic == {"A": {"tested": 5, "before": 1.0, "after": 0.0}, "B": None, "C": None}


def test_federated_covbat_through_the_phases_equals_the_pooled_covbat(tmp_path: Path):
    """ComBat's rounds, CovBat's products, then ComBat's rounds again on the scores: every
    site's harmonized rows are those of CovBat fitted on the pooled training rows."""
    protocol = load_protocol("preset:spine_mri_t1w")
    protocol = protocol.model_copy(update={"harmonization": HarmonizationSpec(
        covbat=CovbatSpec(pct_var=0.8))})
    sites, kept = prepared_sites(tmp_path / "sites", protocol)
    settings = StudySettings(protocol, tmp_path / "study",
                             combat=CombatOptions(min_batch_size=8, min_cell=3))
    settings.out_dir.mkdir()
    transport = FakeSites(sites, protocol)
    failed = run_combat(transport, {n: s.site_name for n, s in sites.items()}, kept, settings)
    assert failed == {}
    assert [t for t, _ in transport.sent[::3]] == [
        MessageType.COMBAT_DESIGN, MessageType.COMBAT_RESIDUALS, MessageType.COMBAT_MOMENTS,
        MessageType.COVBAT_PRODUCTS, MessageType.COMBAT_DESIGN, MessageType.COMBAT_RESIDUALS,
        MessageType.COMBAT_MOMENTS, MessageType.COMBAT_APPLY]
    design, _ = combat_design(protocol, kept)
    pooled = fit_covbat([pooled_rows(sites.values(), protocol)], design, settings.combat,
                        pct_var=0.8)
    report = json.loads((settings.out_dir / "combat.json").read_text())["covbat"]
    k = pooled.axes.components.shape[1]
    assert report["status"] == "done" and report["components"] == k and 1 < k < 5
    plain = fit_combat([pooled_rows(sites.values(), protocol)], design, settings.combat)
    for site in sites.values():
        y, batch, covariates, _ = combat.combat_inputs(site, protocol, split=None)
        got = pd.read_parquet(study_dir(site, protocol) / HARMONIZED_FILE)
        got = got[[f"f{j}" for j in range(5)]].to_numpy()
        expected = pooled.transform(y, batch, covariates)
        scale = y.std(axis=0)
        np.testing.assert_allclose(got / scale, expected / scale, rtol=0, atol=1e-8)
        # CovBat moved the rows beyond ComBat's
        assert np.abs(got - plain.transform(y, batch, covariates)).max() > 1e-3


def test_covbat_that_cannot_run_leaves_the_sites_with_combat(tmp_path: Path):
    protocol = load_protocol("preset:spine_mri_t1w").model_copy(update={
        "harmonization": HarmonizationSpec(covbat=CovbatSpec())})
    sites, kept = prepared_sites(tmp_path / "sites", protocol)
    settings = StudySettings(protocol, tmp_path / "study",
                             combat=CombatOptions(min_batch_size=8, min_cell=3))
    settings.out_dir.mkdir()
    nodes = {n: s.site_name for n, s in sites.items()}
    transport = FakeSites(sites, protocol, fail={(n, MessageType.COVBAT_PRODUCTS): "error 400: no"
                                                 for n in (1, 2)})
    failed = run_combat(transport, nodes, kept, settings)
    assert failed == {"A": "query.covbat_products: error 400: no",
                      "B": "query.covbat_products: error 400: no"}
    report = json.loads((settings.out_dir / "combat.json").read_text())
    assert report["covbat"]["status"] == "not run"
    assert report["covbat"]["reason"].startswith("CovBat round 1: 1 site(s) answered")
    assert report["harmonized_rows"] == {"C": 24}
    # C applied ComBat alone: its rows are ComBat's
    design, _ = combat_design(protocol, kept)
    central = fit_combat([pooled_rows(sites.values(), protocol)], design, settings.combat)
    y, batch, covariates, _ = combat.combat_inputs(sites[3], protocol, split=None)
    got = pd.read_parquet(study_dir(sites[3], protocol) / HARMONIZED_FILE)
    np.testing.assert_allclose(got[[f"f{j}" for j in range(5)]].to_numpy(),
                               central.transform(y, batch, covariates), rtol=1e-9, atol=1e-9)


def test_the_radiomics_phase_through_the_fake_transport_equals_the_pooled_fit(tmp_path: Path):
    """Screening, the penalty path and federated cross-validation for all sites and each site
    left out, driven round by round by the server's phase: every chosen model is the pooled
    recipe's; every site scores the federated, leave-site-out and local models."""
    protocol = load_protocol("preset:spine_mri_t1w").model_copy(update={
        "model": ModelSpec(screening_top_k=3, cv_folds=3, n_lambdas=3)})
    sites, kept = prepared_sites(tmp_path / "sites", protocol)
    settings = StudySettings(protocol, tmp_path / "study")
    settings.out_dir.mkdir()
    nodes = {n: s.site_name for n, s in sites.items()}
    names = kept[0].feature_names
    models, sets, report = run_model(FakeSites(sites, protocol), nodes, names, settings, False,
                                     site_update=frozenset({"A", "B", "C"}))
    assert report["failed"] == {}
    label, spec = protocol.task.label_column, protocol.model
    for name, members in sets.items():
        rows = []
        for site in sites.values():
            if site.site_name in members:
                table = pd.read_parquet(study_dir(site, protocol) / PREPARED_FILE)
                train = table[table.split == "train"]
                rows.append((train[list(names)].to_numpy(float),
                             train[label].to_numpy(float), train.fold.to_numpy()))
        pooled, _ = fit_pooled(rows, "logistic", spec.penalty, spec.screening_top_k,
                               spec.n_lambdas, spec.cv_folds, spec.lambda_rule)
        np.testing.assert_array_equal(models[name].features, pooled.features)
        np.testing.assert_allclose(models[name].beta, pooled.beta, atol=1e-6, err_msg=name)
    assert set(sets) == {"federated", "without A", "without B", "without C"}
    assert np.any(models["federated"].beta[1:] != 0)  # the label signal was found
    withheld = 0
    for site, result in report["sites"].items():
        assert set(result["metrics"]) == {"federated", "leave-site-out", "local A", "local B",
                                          "local C", "site-updated"}, site
        # what left each site: no confusion matrix with a cell under the minimum; the site's
        # own report keeps the whole table, and which update its cross-validation chose
        kept = json.loads((report_dir(sites[next(n for n, s in nodes.items() if s == site)],
                                      protocol) / "evaluation_raw.json").read_text())
        assert kept["models"]["site-updated"]["choice"] in candidates()
        sent, full = result["update"], kept["models"]["site-updated"]  # what left of the update
        assert sent == {"choice": full["choice"], "deviance": {
            k: v if np.isfinite(v) else None for k, v in full["cv_deviance"].items()}}
        html = (report_dir(sites[next(n for n, s in nodes.items() if s == site)], protocol)
                / "site_report.html").read_text()
        assert f"cross-validation chose <strong>{kept['models']['site-updated']['choice']}" \
            in html
        for name, row in result["metrics"].items():
            cells = [row[c] for c in ("tp", "fp", "tn", "fn")]
            full = [kept["metrics"]["models"][name][c] for c in ("tp", "fp", "tn", "fn")]
            assert None not in full
            if None in cells:
                withheld += 1
                assert min(c for c in full if c > 0) < protocol.validation.min_count
                assert row["sensitivity"] is None and row["ppv"] is None
            else:
                assert cells == full
                assert all(c == 0 or c >= protocol.validation.min_count for c in cells)
    assert withheld  # the small test sets (6 patients at B and C) have small cells


def test_a_site_that_fails_or_stays_silent_is_named_and_the_others_go_on(tmp_path: Path):
    protocol = load_protocol("preset:spine_mri_t1w")
    sites, kept = prepared_sites(tmp_path / "sites", protocol)
    settings = StudySettings(protocol, tmp_path / "study", timeout_s=5,
                             combat=CombatOptions(min_batch_size=8, min_cell=3))
    settings.out_dir.mkdir()
    nodes = {n: s.site_name for n, s in sites.items()}
    transport = FakeSites(sites, protocol, fail={(3, MessageType.COMBAT_APPLY): "error 400: no"},
                          silent={(2, MessageType.COMBAT_APPLY)})
    failed = run_combat(transport, nodes, kept, settings)
    assert failed == {"C": "query.combat_apply: error 400: no",
                      "B": "query.combat_apply: no reply within 5 s"}
    # fewer than min-sites left: ComBat does not run, naming each site and why, the sites lost
    # are asked nothing more, and the study goes on with raw features
    transport = FakeSites(sites, protocol, fail={(n, MessageType.COMBAT_DESIGN): "error 400: no"
                                                 for n in (1, 2)})
    failed = run_combat(transport, nodes, kept, settings)
    assert failed == {"A": "query.combat_design: error 400: no",
                      "B": "query.combat_design: error 400: no", "C": "ComBat did not run"}
    report = json.loads((settings.out_dir / "combat.json").read_text())
    assert report["status"] == "not run"
    assert report["reason"].startswith("ComBat round 1: 1 site(s) answered")
    assert [t for t, _ in transport.sent] == [MessageType.COMBAT_DESIGN] * 3


def test_exchange_names_every_site_that_gave_no_payload():
    class Grid:
        def node_ids(self) -> list[int]:
            return [1, 2, 3]

        def send_and_receive(self, message_type, contents, timeout_s):  # noqa: ANN001, ANN201
            return [Reply(1, RecordDict({})), Reply(2, error="error 500: internal error"),
                    Reply(99, error="error 5: Node Unavailable")]  # Flower's, for node 3

    settings = StudySettings(load_protocol("preset:spine_mri_t1w"), Path("unused"))
    replies, failed = exchange(Grid(), {1: "A", 2: "B", 3: "C"}, MessageType.HANDSHAKE,
                               lambda _: RecordDict({}), settings)
    assert list(replies) == ["A"]
    assert failed == {"B": "query.handshake: error 500: internal error",
                      "C": "query.handshake: error 5: Node Unavailable"}


def test_the_handshake_waits_for_registered_sites_a_grace_period_and_no_longer():
    class Joining:
        """Node 1 and 2 connected, node 3 from the third look on; node 4 never."""

        def __init__(self) -> None:
            self.looks = 0

        def node_ids(self) -> list[int]:
            self.looks += 1
            return [1, 2, 3] if self.looks >= 3 else [1, 2]

    # every registered node there: no grace period waited out
    joining = Joining()
    assert wait_for_nodes(joining, 2, 60, expected=[1, 2, 3], grace_s=60) == [1, 2, 3]
    assert joining.looks == 3
    # a registered node that never connects: the study begins after the grace period
    start = time.monotonic()
    assert wait_for_nodes(Joining(), 2, 60, expected=[1, 2, 3, 4], grace_s=1.2) == [1, 2, 3]
    assert 1.2 <= time.monotonic() - start < 5
    # nothing expected (a simulation): at once with min-sites
    assert wait_for_nodes(Joining(), 2, 60) == [1, 2]
    # fewer than min-sites: until the timeout
    assert wait_for_nodes(Joining(), 4, 1.0, expected=[1, 2, 3, 4]) == [1, 2, 3]


def test_a_site_update_that_fails_leaves_the_federated_model_and_says_why(tmp_path: Path,
                                                                          monkeypatch):  # noqa: ANN001
    from common.glm import ModelError

    protocol = load_protocol("preset:spine_mri_t1w")
    sites, _ = prepared_sites(tmp_path / "sites", protocol)

    def failing(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ModelError("the logistic Hessian is singular")

    monkeypatch.setattr(validation, "update_at_site", failing)
    federated = object()
    update = validation.update_here(sites[1], protocol, False, federated, seed=0)
    assert update.model is federated and update.deviance == {}
    assert update.choice == "federated (the update failed: the logistic Hessian is singular)"
