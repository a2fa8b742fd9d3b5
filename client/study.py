"""What a site does in each phase of a federated study, independent of Flower.

``client/app.py`` unpacks a message, calls one function here and packs the reply. Replies carry
counts, sums and codes, never a path, a traceback or a patient's value.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from common.errors import ConfigError
from common.protocol import StudyProtocol, TaskKind, protocol_from_mapping
from common.site_config import SiteConfig, load_site_config

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from common.selection import BatchRequest, BatchTerms, Comoments, LinearModel
    from harmonization.combat import (
        BatchAdjustment,
        CombatModel,
        CombatOptions,
        Design,
        LocationFit,
    )


@dataclass(frozen=True)
class HandshakeReply:
    """A site's answer to the study protocol: counts only.

    ``status`` is ``"ok"`` or ``"refused"``; a refusal carries a stable ``code`` and a short
    ``reason`` (no path). ``label_counts`` is ``"0:n0,1:n1"`` for classification (empty for
    regression); ``skipped`` is ``"reason:count,..."``.
    """

    site: str
    status: str
    protocol_hash: str
    code: str = ""
    reason: str = ""
    n_rows: int = 0
    n_usable: int = 0
    skipped: str = ""
    label_counts: str = ""


def resolve_site(node_config: dict[str, object], run_config: dict[str, object]) -> SiteConfig:
    """This SuperNode's site: from ``site-config`` (a site config file, in deployment) or, in
    the simulation engine, from the run's ``simulation-cohort`` folder and the node's
    ``partition-id`` (the cohort's sites in name order)."""
    if node_config.get("site-config"):
        return load_site_config(Path(str(node_config["site-config"])))
    cohort = str(run_config.get("simulation-cohort", "") or "")
    if not cohort or "partition-id" not in node_config:
        raise ConfigError("node config", ["set 'site-config' (deployment) or the run config's "
                                          "'simulation-cohort' (simulation)"])
    root = Path(cohort)
    sites = sorted(p.parent for p in root.glob("*/manifest.csv"))
    index = int(str(node_config["partition-id"]))
    if not 0 <= index < len(sites):
        raise ConfigError(str(root), [f"partition {index} has no site: {len(sites)} site "
                                      "folders with a manifest.csv"])
    site = sites[index]
    # one worker: the simulation engine runs every virtual site on this one machine
    return SiteConfig(site_name=site.name, manifest=site / "manifest.csv",
                      work_dir=root / "work" / site.name, workers=1)


def handshake(site: SiteConfig, protocol_json: str, protocol_hash: str) -> HandshakeReply:
    """Check the study protocol and this site's manifest against it; answer with counts."""
    from client.manifest import read_manifest

    def refuse(code: str, reason: str) -> HandshakeReply:
        return HandshakeReply(site.site_name, "refused", protocol_hash, code, reason)

    try:
        protocol = protocol_from_mapping(json.loads(protocol_json), source="study protocol")
    except (ConfigError, json.JSONDecodeError) as exc:
        return refuse("protocol_invalid", str(exc).splitlines()[0][:200])
    if protocol.content_hash() != protocol_hash:
        return refuse("protocol_hash_mismatch",
                      "the protocol received does not match its hash (altered in transit, or "
                      "another software version)")
    try:
        cases, problems = read_manifest(site.manifest, protocol, default_batch=site.site_name)
    except ConfigError as exc:
        return refuse("manifest_unusable", exc.problems[0][:200] if exc.problems else "")
    return HandshakeReply(
        site.site_name, "ok", protocol_hash, n_rows=len(cases) + len(problems),
        n_usable=len(cases),
        skipped=_format_counts(sorted(Counter(p.reason.value for p in problems).items())),
        label_counts=_label_counts(protocol, [c.label for c in cases]))


def _format_counts(pairs: Iterable[tuple[object, int]]) -> str:
    """``"name:count,..."``: how counts travel in a reply (``server.study`` reads them back)."""
    return ",".join(f"{name}:{count}" for name, count in pairs)


def _label_counts(protocol: StudyProtocol, labels: list[float]) -> str:
    if protocol.task.kind is not TaskKind.CLASSIFICATION:
        return ""
    counts = Counter(int(v) for v in labels)
    return _format_counts((k, counts.get(k, 0)) for k in (0, 1))


# --- phase 2: local preparation -----------------------------------------------------------------

PREPARED_FILE = "prepared.parquet"
HARMONIZED_FILE = "harmonized.parquet"
NON_FEATURES = ("case_id", "batch", "split", "fold")


@dataclass(frozen=True)
class PrepareReply:
    """Counts after extraction and the local split; the scanner names with their training
    counts (``"name:count,..."``) and a hash of the feature names, so the server can check
    every site computed the same features."""

    site: str
    status: str
    code: str = ""
    reason: str = ""
    n_train: int = 0
    n_test: int = 0
    skipped: str = ""
    train_labels: str = ""
    test_labels: str = ""
    batches: str = ""
    n_features: int = 0
    features_hash: str = ""
    feature_names: tuple[str, ...] = ()

    #: What may leave a site (:func:`common.records.check_sent`): none, or every feature name.
    AXES: ClassVar = {"feature_names": ("features",)}


def study_dir(site: SiteConfig, protocol: StudyProtocol) -> Path:
    """Where this site keeps the study's local results (never sent)."""
    return site.work_dir / "study" / protocol.short_hash


def feature_columns(table: "pd.DataFrame", protocol: StudyProtocol) -> list[str]:
    skip = {*NON_FEATURES, protocol.task.label_column, *protocol.covariates.columns}
    return [c for c in table.columns if c not in skip]


def feature_width(site: SiteConfig, protocol: StudyProtocol) -> int | None:
    """The number of feature columns of this site's prepared table (None before the
    preparation): fixed by the protocol's extraction settings, the same at every site (the
    server checks their names' hash). Read from the table's schema, not its rows."""
    import pandas as pd
    import pyarrow.parquet as pq

    path = study_dir(site, protocol) / PREPARED_FILE
    if not path.is_file():
        return None
    return len(feature_columns(pd.DataFrame(columns=pq.read_schema(path).names), protocol))


def prepare(site: SiteConfig, protocol: StudyProtocol, seed: int, test_fraction: float
            ) -> PrepareReply:
    """Ingest, standardize and extract (cached), then split train/test, stratified by label and
    seeded by the study seed and the site's name: the split never changes across phases."""
    import hashlib

    import numpy as np
    from sklearn.model_selection import train_test_split

    from client.manifest import read_manifest
    from client.pipeline import features_table, run_cases
    from common.provenance import atomic_write_parquet
    from common.selection import assign_folds

    cases, problems = read_manifest(site.manifest, protocol, default_batch=site.site_name)
    outcomes = run_cases(cases, protocol, mode="extract", workers=site.n_workers,
                         cache_dir=site.cache_dir)
    skipped = Counter([p.reason.value for p in problems]
                      + [o.reason.value for o in outcomes if o.reason is not None])
    table = features_table(cases, outcomes, protocol).to_pandas()
    if len(table) < 4:
        return PrepareReply(site.site_name, "refused", "too_few_cases",
                            f"{len(table)} usable cases")
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
    table["fold"] = -1  # cross-validation folds of the training rows, seeded like the split
    table.loc[train, "fold"] = assign_folds(labels[train], protocol.model.cv_folds, state,
                                            stratify is not None)
    atomic_write_parquet(study_dir(site, protocol) / PREPARED_FILE, table)
    names = feature_columns(table, protocol)
    is_train = table["split"] == "train"
    counts = table.loc[is_train, "batch"].value_counts().sort_index()
    reply = PrepareReply(
        site.site_name, "ok", n_train=int(is_train.sum()), n_test=int((~is_train).sum()),
        skipped=_format_counts(sorted(skipped.items())),
        train_labels=_label_counts(protocol, list(labels[is_train.to_numpy()])),
        test_labels=_label_counts(protocol, list(labels[~is_train.to_numpy()])),
        batches=_format_counts(counts.items()),
        n_features=len(names),
        features_hash=hashlib.sha256("\n".join(names).encode()).hexdigest(),
        feature_names=tuple(names))
    from client.report import record_prepare

    record_prepare(site, protocol, reply, [
        {"case_id": c.case_id, "row": c.row, "reason": c.reason.value, "detail": c.detail}
        for c in [*problems, *(o for o in outcomes if o.reason is not None)]])
    return reply


def load_study_table(site: SiteConfig, protocol: StudyProtocol, name: str) -> "pd.DataFrame":
    """One of the tables a phase kept at this site (``PREPARED_FILE``, ``HARMONIZED_FILE``)."""
    import pandas as pd

    path = study_dir(site, protocol) / name
    if not path.is_file():
        raise ConfigError(str(path), [f"missing: the phase that writes {name} has not run here"])
    return pd.read_parquet(path)


# --- phase 3: federated ComBat, the site's halves ------------------------------------------------

def combat_inputs(site: SiteConfig, protocol: StudyProtocol, split: str | None = "train"
                  ) -> tuple["np.ndarray", list[str], dict[str, list[object]], "pd.DataFrame"]:
    """Features, batches and covariates of this site's rows (one split, or all). The training
    rows carry the label as a covariate when the protocol protects the outcome (0/1 for
    classification, the value for regression); rows read to be harmonized never do."""
    table = load_study_table(site, protocol, PREPARED_FILE)
    if split is not None:
        table = table[table["split"] == split].reset_index(drop=True)
    names = feature_columns(table, protocol)
    covariates = {c: table[c].tolist() for c in protocol.covariates.columns}
    if split == "train" and protocol.covariates.protect_outcome:
        label = table[protocol.task.label_column]
        covariates[protocol.task.label_column] = (
            label.astype(int).tolist() if protocol.task.kind is TaskKind.CLASSIFICATION
            else label.astype(float).tolist())
    return table[names].to_numpy(float), table["batch"].astype(str).tolist(), covariates, table


def combat_model_at_site(site: SiteConfig, protocol: StudyProtocol, design: "Design",
                         options: "CombatOptions", fit: "LocationFit",
                         var_pooled: "np.ndarray",
                         shared: dict[str, "BatchAdjustment"]) -> "CombatModel":
    """The fitted model as this site holds it: the server's pooled estimates, the adjustments of
    shared batches from the server, and its own batches' EB computed here from its rows."""
    import numpy as np

    from harmonization.combat import (
        CombatModel,
        estimate_batch_adjustment,
        site_batch_moments,
        standardize,
    )

    y, batch, covariates, _ = combat_inputs(site, protocol)
    z = standardize(y, batch, covariates, design, fit, var_pooled)
    adjustments = dict(shared)
    for name, moments in site_batch_moments(z, batch, design).items():
        if name not in adjustments:
            adjustments[name] = estimate_batch_adjustment(moments, options)
    n_features = y.shape[1]
    gamma = np.stack([adjustments[b].gamma if b in adjustments else np.full(n_features, np.nan)
                      for b in design.batches])
    delta = np.stack([adjustments[b].delta if b in adjustments else np.full(n_features, np.nan)
                      for b in design.batches])
    return CombatModel(design, options, fit.beta, fit.grand_mean, var_pooled, gamma, delta,
                       fit.batch_counts)


def harmonize_site(site: SiteConfig, protocol: StudyProtocol, model: "CombatModel") -> int:
    """Apply the model to all of this site's rows (train and test); keep them here."""
    import numpy as np

    from common.errors import HarmonizationError
    from common.provenance import atomic_write_parquet

    y, batch, covariates, table = combat_inputs(site, protocol, split=None)
    unfitted = sorted({b for b in batch if b not in model.design.batches
                       or np.isnan(model.gamma[model.design.batches.index(b)]).any()})
    if unfitted:
        raise HarmonizationError(f"scanner(s) {unfitted} have test rows but no training rows "
                                 "at this site")
    table[feature_columns(table, protocol)] = model.transform(y, batch, covariates)
    atomic_write_parquet(study_dir(site, protocol) / HARMONIZED_FILE, table)
    return len(table)


# --- phase 4: the radiomics model, the site's halves ----------------------------------------------

#: A site never sends sums over fewer training rows than this, whatever the server asks.
MIN_ROWS_SENT = 5


def loss_of(protocol: StudyProtocol) -> str:
    """The GLM loss of the study's task."""
    return "logistic" if protocol.task.kind is TaskKind.CLASSIFICATION else "gaussian"


def _split_table(site: SiteConfig, protocol: StudyProtocol, harmonized: bool, split: str
                 ) -> "pd.DataFrame":
    table = load_study_table(site, protocol, HARMONIZED_FILE if harmonized else PREPARED_FILE)
    table = table[table["split"] == split]
    if split == "train" and len(table) < MIN_ROWS_SENT:
        from common.glm import ModelError

        raise ModelError(f"site '{site.site_name}' has {len(table)} training rows, fewer than "
                         f"{MIN_ROWS_SENT}: it sends no sums over them")
    return table


def model_rows(site: SiteConfig, protocol: StudyProtocol, harmonized: bool, split: str
               ) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """Features, labels and CV folds of one split, raw or after federated ComBat. Training rows
    are refused below :data:`MIN_ROWS_SENT`: their sums would come close to a patient's values."""
    table = _split_table(site, protocol, harmonized, split)
    return (table[feature_columns(table, protocol)].to_numpy(float),
            table[protocol.task.label_column].to_numpy(float), table["fold"].to_numpy())


def _clinical_columns(protocol: StudyProtocol) -> list[tuple[str, str | None]]:
    """The nomogram's clinical columns as (covariate, level): for each covariate in
    ``model.clinical``, one 0/1 column per level but the first (the reference) of a categorical
    one, or (covariate, None) for the continuous value."""
    out: list[tuple[str, str | None]] = []
    for column in protocol.model.clinical:
        levels = protocol.covariates.categorical.get(column)
        out += [(column, level) for level in levels[1:]] if levels else [(column, None)]
    return out


def clinical_terms(protocol: StudyProtocol) -> list[str]:
    """The names of the nomogram's clinical columns (``iss_stage=II``, ``age``)."""
    return [column if level is None else f"{column}={level}"
            for column, level in _clinical_columns(protocol)]


def _nomogram_design(table: "pd.DataFrame", protocol: StudyProtocol, x: "np.ndarray",
                     radiomics: list["LinearModel"]) -> "np.ndarray":
    """One block of columns per radiomics model: its score (a logit) and the clinical
    columns."""
    import numpy as np

    clinical = [table[column].to_numpy(float) if level is None
                else (table[column].astype(str) == str(level)).to_numpy(float)
                for column, level in _clinical_columns(protocol)]
    return np.hstack([np.column_stack([model.score(x), *clinical]) for model in radiomics])


def nomogram_rows(site: SiteConfig, protocol: StudyProtocol, harmonized: bool, split: str,
                  radiomics: list["LinearModel"]) -> tuple["np.ndarray", "np.ndarray",
                                                            "np.ndarray"]:
    """The nomogram's design at this site, one block of columns per radiomics model (one per
    training set): the model's score (the radiomics score, a logit) and the clinical columns."""
    table = _split_table(site, protocol, harmonized, split)
    x = table[feature_columns(table, protocol)].to_numpy(float)
    return (_nomogram_design(table, protocol, x, radiomics),
            table[protocol.task.label_column].to_numpy(float), table["fold"].to_numpy())


def model_summary(site: SiteConfig, protocol: StudyProtocol, harmonized: bool
                  ) -> tuple["Comoments", "LinearModel | None"]:
    """The first model round: this site's comoments over its training rows, and its local-only
    model (the same recipe on its own rows: the baseline that shows what federation adds; None
    when its rows cannot support one, e.g. too few of a class for the folds)."""
    from common.glm import ModelError
    from common.selection import fit_pooled, site_comoments

    x, y, folds = model_rows(site, protocol, harmonized, "train")
    spec = protocol.model
    try:
        local, _ = fit_pooled([(x, y, folds)], loss_of(protocol), spec.penalty,
                              spec.screening_top_k, spec.n_lambdas, spec.cv_folds,
                              spec.lambda_rule, MIN_ROWS_SENT)
    except ModelError:
        local = None
    return site_comoments(x, y), local


def model_terms(site: SiteConfig, protocol: StudyProtocol, harmonized: bool,
                request: "BatchRequest", radiomics: list["LinearModel"] | None = None
                ) -> "BatchTerms":
    """This site's terms for a batch of fits: of the radiomics model, or (``radiomics`` given)
    of the nomogram on the scores of those models and the clinical columns."""
    from common.selection import site_batch_terms

    if radiomics is None:
        x, y, folds = model_rows(site, protocol, harmonized, "train")
    else:
        x, y, folds = nomogram_rows(site, protocol, harmonized, "train", radiomics)
    return site_batch_terms(x, y, folds, request, loss_of(protocol), MIN_ROWS_SENT)


@dataclass(frozen=True)
class ModelMetrics:
    """One site's test metrics of each model it was sent, as JSON ``{"models": {model: {metric:
    value or binned curve}}, "comparisons": {"a vs b": DeLong test}}`` (NaN where a metric is
    undefined, e.g. AUC on one class): never a per-patient score."""

    site: str
    n_test: int
    n_positive: int
    table: str


def metrics_of(protocol: StudyProtocol, y: "np.ndarray", score: "np.ndarray",
               threshold: float = 0.5, seed: int = 0) -> dict[str, object]:
    """One model's metrics on test rows (:mod:`common.metrics`): for classification the AUC with
    DeLong and bootstrap CIs, the metrics at ``threshold`` (a risk), Brier, calibration and the
    binned curves (bins of at least the protocol's ``validation.min_count``); for regression r
    and Spearman with CIs, MAE, RMSE and Bland-Altman."""
    from common.metrics import classification_table, regression_table

    if protocol.task.kind is TaskKind.CLASSIFICATION:
        v = protocol.validation
        return classification_table(y, score, threshold, min_count=v.min_count,
                                    n_bins=v.n_bins, bootstrap=v.bootstrap,
                                    decision_thresholds=v.decision_thresholds, seed=seed)
    return regression_table(y, score)


def paired_comparisons(y: "np.ndarray", scores: dict[str, "np.ndarray"], reference: str
                       ) -> dict[str, dict[str, float]]:
    """DeLong's paired test of ``reference`` against every other model on the same test rows
    (classification with both classes present; otherwise none)."""
    from dataclasses import asdict

    from common.metrics import delong_test

    if reference not in scores or not 0 < y.sum() < len(y):
        return {}
    return {f"{reference} vs {name}": asdict(delong_test(y, scores[reference], score))
            for name, score in scores.items() if name != reference}


def evaluate_models(site: SiteConfig, protocol: StudyProtocol, harmonized: bool,
                    models: dict[str, "LinearModel"],
                    radiomics: dict[str, "LinearModel"] | None = None,
                    thresholds: dict[str, float] | None = None, seed: int = 0) -> ModelMetrics:
    """Each model's metrics on this site's test rows, and DeLong's test of the first model (the
    federated one) against each other; a nomogram (named in ``radiomics``, with the radiomics
    model whose score it takes) on its design. ``thresholds``: each model's risk cut-off, fixed
    on its training data (default 0.5)."""
    test = _split_table(site, protocol, harmonized, "test")
    names = feature_columns(test, protocol)
    x = test[names].to_numpy(float)
    y = test[protocol.task.label_column].to_numpy(float)
    scores = {name: model.score(_nomogram_design(test, protocol, x, [radiomics[name]])
                                if radiomics and name in radiomics else x)
              for name, model in models.items()}
    table = {name: metrics_of(protocol, y, score, (thresholds or {}).get(name, 0.5), seed)
             for name, score in scores.items()}
    classification = protocol.task.kind is TaskKind.CLASSIFICATION
    comparisons = (paired_comparisons(y, scores, next(iter(scores)))
                   if classification and scores else {})
    positives = int(y.sum()) if classification else 0
    content = {"models": table, "comparisons": comparisons}
    from client.report import record_evaluation

    terms = {name: {"intercept": float(model.beta[0]), "coefficients": (
        dict(zip(["radiomics score", *clinical_terms(protocol)], model.beta[1:].tolist()))
        if radiomics and name in radiomics else
        {names[i]: float(c) for i, c in zip(model.features, model.beta[1:]) if c != 0})}
        for name, model in models.items()}
    record_evaluation(site, protocol, "nomogram" if radiomics else
                      ("harmonized" if harmonized else "raw"), content, y, scores, terms)
    return ModelMetrics(site.site_name, len(y), positives, json.dumps(content))
