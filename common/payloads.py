"""What a site sends back in the study's own phases (handshake, preparation, model metrics),
and the small rules both sides share about them.

The two sides meet here: a site builds these replies (``client/phases``), the coordinator reads
them (``server/phases``), the privacy guard holds them to their declared axes
(:func:`common.records.check_sent`). Counts travel as ``"name:count,..."`` strings; nothing in
a reply is a path, a traceback or a patient's value.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

from common.protocol import StudyProtocol, TaskKind

#: A site never sends sums over fewer training rows than this, whatever the server asks.
MIN_ROWS_SENT = 5

#: The name a site scores the federated model under once it has updated it on its own rows.
SITE_UPDATED = "site-updated"
#: The same for the federated nomogram (its intercept and coefficients updated at the site).
NOMOGRAM_SITE_UPDATED = "nomogram site-updated"
#: The nomogram's ridge penalty (per row), federated and at a site: next to nothing, but finite
#: when a small training set separates the classes.
NOMOGRAM_L2 = 1e-4


@dataclass(frozen=True)
class HandshakeReply:
    """A site's answer to the study protocol: counts only.

    ``status`` is ``"ok"`` or ``"refused"``; a refusal carries a stable ``code`` and a short
    ``reason`` (no path). ``label_counts`` is ``"0:n0,1:n1"`` for classification (empty for
    regression); ``skipped`` is ``"reason:count,..."``. Every count, in a field or a string, is
    0, at least the site's ``min_patients``, or :data:`SUPPRESSED` (see :func:`released`).
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

    COUNTS: ClassVar = {"n_rows": "min_patients", "n_usable": "min_patients",
                        "skipped": "min_patients", "label_counts": "min_patients"}


@dataclass(frozen=True)
class PrepareReply:
    """Counts after extraction and the local split; the scanner names with their training
    counts (``"name:count,..."``) and a hash of the feature names, so the server can check
    every site computed the same features. Counts follow :func:`released`."""

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
    COUNTS: ClassVar = {f: "min_patients" for f in ("n_train", "n_test", "skipped",
                                                    "train_labels", "test_labels", "batches")}


@dataclass(frozen=True)
class ModelMetrics:
    """One site's test metrics of each model it was sent, as JSON ``{"models": {model: {metric:
    value or binned curve}}, "comparisons": {"a vs b": DeLong test}}`` (NaN where a metric is
    undefined, e.g. AUC on one class): never a per-patient score. The counts follow
    :func:`released`."""

    site: str
    n_test: int
    n_positive: int
    table: str

    COUNTS: ClassVar = {"n_test": "min_patients", "n_positive": "min_patients"}


# --- the CNN's metric replies --------------------------------------------------------------------

@dataclass(frozen=True)
class SplitMetrics:
    """Metrics of one split's crops: numbers only, never a per-patient value.

    ``n`` crops and ``n_positive`` of them labelled 1 (classification; 0 for regression).
    ``loss`` as in training (BCE, or MSE on the scaled target); ``auc`` (classification, NaN
    with one class present); ``pearson_r`` and ``mae`` (regression, MAE in label units). Every
    metric is NaN below :data:`common.payloads.MIN_ROWS_SENT` crops.
    """

    n: int
    n_positive: int
    loss: float
    auc: float
    pearson_r: float
    mae: float


@dataclass(frozen=True)
class CnnMetrics:
    """A site's evaluation of one set of global weights: its test crops and, for training
    curves, its training crops (``None`` when not asked for)."""

    site: str
    test: SplitMetrics
    train: SplitMetrics | None
    seconds: float

    def as_record(self) -> dict[str, int | float]:
        """Flat ``{"test_auc": ..., "train_n": ...}``: what a metrics reply carries."""
        out: dict[str, int | float] = {}
        for prefix, metrics in (("test", self.test), ("train", self.train)):
            if metrics is not None:
                out.update({f"{prefix}_{k}": v for k, v in asdict(metrics).items()})
        out["seconds"] = self.seconds
        return out


#: The CNN trained without the site that scores it (``cnn.leave_site_out``): the model an
#: evaluate request names when it asks for that model's test metrics alone.
CNN_LEAVE_SITE_OUT = "CNN leave-site-out"

#: A count of 1 to the site's minimum - 1, as it leaves the site (see :func:`released`).
SUPPRESSED = -1


def released(count: int, minimum: int) -> int:
    """A count as it may leave a site: itself when 0 or at least ``minimum`` (the site's
    ``min_patients``), else :data:`SUPPRESSED` (a small count says a patient of that kind
    exists)."""
    return count if count == 0 or count >= minimum else SUPPRESSED


def format_counts(pairs: Iterable[tuple[object, int]], minimum: int | None = None) -> str:
    """``"name:count,..."``: how counts travel in a reply (:func:`parse_counts` reads them);
    with ``minimum``, each count as :func:`released` lets it leave."""
    return ",".join(f"{name}:{count if minimum is None else released(int(count), minimum)}"
                    for name, count in pairs)


def shown_count(count: int) -> int | str:
    """A count for a report: a suppressed one as "under the minimum"."""
    return "under the minimum" if count == SUPPRESSED else count


def shown_counts(text: str) -> str:
    """A ``"name:count,..."`` string for a report, a suppressed count as "under the minimum"."""
    return ", ".join(f"{name}: {shown_count(count)}"
                     for name, count in parse_counts(text).items()) if text else ""


def parse_counts(text: str) -> dict[str, int]:
    """The counts of a ``"name:count,..."`` string (empty: none)."""
    out: dict[str, int] = {}
    for part in filter(None, text.split(",")):
        name, _, count = part.rpartition(":")
        out[name] = int(count)
    return out


def label_counts(protocol: StudyProtocol, labels: Sequence[float], minimum: int | None = None
                 ) -> str:
    """``"0:n0,1:n1"`` for a classification task (``labels``: the classes) or a survival one
    (``labels``: the events, 1, and censored times, 0), empty otherwise (with ``minimum``: as
    they may leave the site)."""
    if protocol.task.kind is TaskKind.REGRESSION:
        return ""
    counts = Counter(int(v) for v in labels)
    return format_counts(((k, counts.get(k, 0)) for k in (0, 1)), minimum)


def loss_of(protocol: StudyProtocol) -> str:
    """The loss of the study's task: the logistic GLM's, the Gaussian one's or the stratified
    Cox model's partial likelihood."""
    return {TaskKind.CLASSIFICATION: "logistic", TaskKind.REGRESSION: "gaussian",
            TaskKind.SURVIVAL: "cox"}[protocol.task.kind]


def clinical_columns(protocol: StudyProtocol) -> list[tuple[str, str | None]]:
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
            for column, level in clinical_columns(protocol)]


def evaluated_models(names: Sequence[str], site_update: bool, nomogram: bool) -> list[str]:
    """The models a site's metrics table holds for an evaluation request of ``names``: those,
    and the federated radiomics model (or, in a ``nomogram``'s evaluation, the federated
    nomogram) updated at the site where the request asks for it (``site_update``)."""
    base, added = ("nomogram", NOMOGRAM_SITE_UPDATED) if nomogram else ("federated",
                                                                       SITE_UPDATED)
    update = site_update and base in names and added not in names
    return [*names, added] if update else list(names)
