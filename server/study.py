"""The coordinator's side of a study, independent of Flower: settings and the checks between
phases. ``server/app.py`` sends the messages and calls these."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from collections import Counter

from client.study import HandshakeReply, PrepareReply
from common.errors import ConfigError, MyeloFedError
from common.protocol import StudyProtocol, TaskKind, load_protocol
from harmonization.combat import CombatOptions, Design


PHASES = ("handshake", "prepare", "combat", "model", "cnn")


class StudyStopped(MyeloFedError):
    """The study cannot go on: too few sites left, with each excluded site and its reason."""


@dataclass(frozen=True)
class StudySettings:
    """What the coordinator decides for a run (Flower's run config, typed once)."""

    protocol: StudyProtocol
    out_dir: Path
    min_sites: int = 2
    min_cases_per_site: int = 10
    timeout_s: float = 600.0
    seed: int = 0
    test_fraction: float = 0.3
    combat: CombatOptions = CombatOptions()
    until: str = PHASES[-1]  # the last phase to run
    radiomics: bool = True  # False: an image-only study (no ComBat, no radiomics model)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> StudySettings:
        try:
            protocol = load_protocol(str(run_config.get("protocol", "preset:spine_mri_t1w")))
            settings = cls(protocol, Path(str(run_config.get("out-dir", "myelofed-study"))),
                           int(run_config.get("min-sites", 2)),
                           int(run_config.get("min-cases-per-site", 10)),
                           float(run_config.get("timeout-s", 600.0)),
                           int(run_config.get("seed", 0)),
                           float(run_config.get("test-fraction", 0.3)),
                           CombatOptions(
                               min_batch_size=int(run_config.get("combat-min-batch-size", 10)),
                               min_cell=int(run_config.get("combat-min-cell", 5))),
                           str(run_config.get("until", PHASES[-1])),
                           _flag(run_config.get("radiomics", True), "radiomics"))
        except (TypeError, ValueError) as exc:
            raise ConfigError("run config", [str(exc)]) from None
        if settings.min_sites < 1 or settings.min_cases_per_site < 1:
            raise ConfigError("run config", ["min-sites and min-cases-per-site must be >= 1"])
        return settings

    def __post_init__(self) -> None:
        if self.until not in PHASES:
            raise ConfigError("run config", [f"until: '{self.until}' is not one of "
                                             f"{', '.join(PHASES)}"])

    def to_run_config(self, protocol_source: str) -> dict[str, str | int | float]:
        """The run config that makes ``flwr run`` use these settings (the inverse of
        :meth:`from_run_config`; the protocol travels as a file or preset name)."""
        return {"protocol": protocol_source, "out-dir": str(self.out_dir),
                "min-sites": self.min_sites, "min-cases-per-site": self.min_cases_per_site,
                "timeout-s": self.timeout_s, "seed": self.seed,
                "test-fraction": self.test_fraction,
                "combat-min-batch-size": self.combat.min_batch_size,
                "combat-min-cell": self.combat.min_cell, "until": self.until,
                "radiomics": self.radiomics}

    def runs(self, phase: str) -> bool:
        """Whether ``phase`` is part of this run: phases up to ``until``, without ComBat and
        the radiomics model in an image-only study (``radiomics`` False)."""
        if phase in ("combat", "model") and not self.radiomics:
            return False
        return PHASES.index(phase) <= PHASES.index(self.until)


def _flag(value: object, key: str) -> bool:
    """A boolean of the run config (TOML true/false, or the words from a command line)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError(f"{key}: {value!r} is not true or false")


def require_sites(replies: dict[str, Any], failed: dict[str, str], settings: StudySettings,
                  phase: str) -> None:
    """Stop the study, naming every failed site, when fewer than min-sites answered."""
    if len(replies) < settings.min_sites:
        detail = "; ".join(f"{site}: {why}" for site, why in sorted(failed.items()))
        raise StudyStopped(f"{phase}: {len(replies)} site(s) answered, fewer than min-sites = "
                           f"{settings.min_sites} ({detail or 'no site connected'})")


@dataclass(frozen=True)
class HandshakeSummary:
    """Which sites go on, which do not and why, and whether the study can go on."""

    sites: list[HandshakeReply]
    excluded: dict[str, str]   # site -> reason
    go_on: bool
    reason: str
    nodes: dict[int, str] = field(default_factory=dict)  # SuperNode id -> site name

    def to_json(self) -> dict[str, Any]:
        return {"sites": [asdict(s) for s in self.sites], "excluded": self.excluded,
                "go_on": self.go_on, "reason": self.reason}


def check_handshake(replies: list[HandshakeReply], failed: dict[str, str],
                    settings: StudySettings) -> HandshakeSummary:
    """Exclude sites that refused, failed or have too few usable cases; go on only with at
    least ``min_sites`` left. ``failed``: node -> error for nodes that gave no usable reply."""
    excluded = dict(failed)
    for reply in replies:
        if reply.status != "ok":
            excluded[reply.site] = f"refused: {reply.code} ({reply.reason})"
        elif reply.protocol_hash != settings.protocol.content_hash():
            excluded[reply.site] = "answered for another protocol"
        elif reply.n_usable < settings.min_cases_per_site:
            excluded[reply.site] = (f"{reply.n_usable} usable cases, fewer than "
                                    f"min-cases-per-site = {settings.min_cases_per_site}")
    kept = [r for r in replies if r.site not in excluded]
    go_on = len(kept) >= settings.min_sites
    reason = (f"{len(kept)} site(s) ready" if go_on else
              f"only {len(kept)} site(s) ready, fewer than min-sites = {settings.min_sites}")
    return HandshakeSummary(replies, excluded, go_on, reason)


def _counts(text: str) -> dict[str, int]:
    """``"name:count,..."`` -> dict (names may hold ':' only before the last one)."""
    out = {}
    for part in filter(None, text.split(",")):
        name, _, count = part.rpartition(":")
        out[name] = int(count)
    return out


@dataclass(frozen=True)
class PrepareSummary:
    sites: list[PrepareReply]
    excluded: dict[str, str]
    go_on: bool
    reason: str

    @property
    def kept(self) -> list[PrepareReply]:
        return [r for r in self.sites if r.site not in self.excluded]

    def to_json(self) -> dict[str, Any]:
        return {"sites": [asdict(s) for s in self.sites], "excluded": self.excluded,
                "go_on": self.go_on, "reason": self.reason}


def check_prepare(replies: list[PrepareReply], failed: dict[str, str],
                  settings: StudySettings) -> PrepareSummary:
    """Exclude sites that failed, refused, or computed other features than the majority."""
    excluded = dict(failed)
    ok = [r for r in replies if r.status == "ok"]
    for reply in replies:
        if reply.status != "ok":
            excluded[reply.site] = f"refused: {reply.code} ({reply.reason})"
    if ok:
        majority, _ = Counter(r.features_hash for r in ok).most_common(1)[0]
        for reply in ok:
            if reply.features_hash != majority:
                excluded[reply.site] = "computed other features than the other sites"
    kept = [r for r in replies if r.site not in excluded]
    go_on = len(kept) >= settings.min_sites
    reason = (f"{len(kept)} site(s) prepared" if go_on else
              f"only {len(kept)} site(s) prepared, fewer than min-sites = {settings.min_sites}")
    return PrepareSummary(replies, excluded, go_on, reason)


def combat_design(protocol: StudyProtocol, kept: list[PrepareReply]) -> tuple[Design, set[str]]:
    """The ComBat design for the sites that go on (their training scanners, the protocol's
    covariates that ComBat protects and, with ``protect_outcome``, the label as a covariate of
    the estimation only) and the batches held by more than one site."""
    holders: Counter[str] = Counter()
    for reply in kept:
        holders.update(_counts(reply.batches).keys())
    covariates = protocol.covariates
    categorical = [(c, tuple(lv)) for c, lv in covariates.categorical.items()
                   if covariates.harmonized(c)]
    continuous = [c for c in covariates.continuous if covariates.harmonized(c)]
    fit_only: tuple[str, ...] = ()
    if covariates.protect_outcome:  # the label as the site sends it: see client.study
        label = protocol.task.label_column
        if protocol.task.kind is TaskKind.CLASSIFICATION:
            categorical.append((label, ("0", "1")))
        else:
            continuous.append(label)
        fit_only = (label,)
    design = Design(tuple(sorted(holders)), tuple(categorical), tuple(continuous),
                    fit_only=fit_only)
    return design, {b for b, k in holders.items() if k > 1}


def summary_rows(models: list[dict[str, Any]], cnn: dict[str, Any] | None = None,
                 nomogram: dict[str, Any] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The demo's table from ``model.json``'s models (and ``cnn.json``): per site, its test size
    and the headline metric (AUC, or Pearson r for regression) of its local-only model, the
    federated model and the model trained without it, on raw features and after federated
    ComBat, the federated nomogram's and the final federated CNN's."""
    raw = next((m for m in models if not m["harmonized"]), None)
    combat = next((m for m in models if m["harmonized"]), None)
    metric = "auc" if (raw or combat or {}).get("loss") == "logistic" else "r"

    def value(model: dict[str, Any] | None, site: str, name: str) -> float | None:
        if model is None:
            return None
        return model["sites"].get(site, {}).get("metrics", {}).get(name, {}).get(metric)

    sites = sorted({s for m in models for s in m["sites"]})
    rows = []
    for site in sites:
        any_model = raw if raw and site in raw["sites"] else combat
        rows.append({
            "site": site, "n_test": any_model["sites"][site]["n_test"] if any_model else 0,
            "local": value(raw, site, f"local {site}"), "federated": value(raw, site, "federated"),
            "federated_combat": value(combat, site, "federated"),
            "leave_site_out": value(raw, site, "leave-site-out"),
            "leave_site_out_combat": value(combat, site, "leave-site-out"),
            "nomogram": (nomogram or {}).get("sites", {}).get(site, {}).get(
                "metrics", {}).get("nomogram", {}).get(metric),
            "cnn": ((cnn or {}).get("final", {}).get(site, {}).get(
                "test_auc" if metric == "auc" else "test_pearson_r"))})
    return metric, rows


#: The models pooled across sites in the multicentre summary: the federated model, the model
#: trained without the site, and each site's own local model (``local <site>`` at that site).
POOLED_MODELS = ("federated", "leave-site-out", "local", "nomogram", "nomogram leave-site-out")


def pool_sites(sites: dict[str, dict[str, Any]], loss: str) -> dict[str, dict[str, Any]]:
    """Per model, the sites' headline metric side by side and their random-effects pooled
    estimate with I-squared (:func:`common.metrics.pool_random_effects`): AUC with its DeLong
    variance (classification), or Pearson r on Fisher's z with variance 1/(n - 3) (regression).
    A site whose metric is undefined is listed but not pooled; fewer than two sites: no pool."""
    import math

    from common.metrics import pool_random_effects

    out = {}
    for kind in POOLED_MODELS:
        rows = {}
        for site, result in sorted(sites.items()):
            row = result.get("metrics", {}).get(f"local {site}" if kind == "local" else kind)
            if row is None:
                continue
            if loss == "logistic":
                value, low, high, var = (row.get(k) for k in ("auc", "auc_low", "auc_high",
                                                              "auc_variance"))
            else:
                value, low, high = row.get("r"), row.get("r_low"), row.get("r_high")
                n = result.get("n_test", 0)
                var = 1.0 / (n - 3) if n > 3 and value is not None and abs(value) < 1 else None
            rows[site] = {"value": value, "low": low, "high": high, "variance": var}
        usable = {s: r for s, r in rows.items()
                  if r["value"] is not None and r["variance"] is not None and r["variance"] > 0}
        pooled = None
        if len(usable) >= 2:
            values = [r["value"] for r in usable.values()]
            if loss != "logistic":
                values = [math.atanh(v) for v in values]
            p = pool_random_effects(values, [r["variance"] for r in usable.values()])
            back = (lambda v: v) if loss == "logistic" else math.tanh
            pooled = {"estimate": back(p.estimate), "low": back(p.low), "high": back(p.high),
                      "tau2": p.tau2, "q": p.q, "i2": p.i2, "p_heterogeneity": p.p_value,
                      "sites": sorted(usable)}
        if rows:
            out[kind] = {"metric": "auc" if loss == "logistic" else "r", "sites": rows,
                         "pooled": pooled}
    return out


def training_prevalence(kept: list[PrepareReply]) -> float | None:
    """The share of positives among the training rows of the sites that go on (from their
    ``train_labels`` counts; None for regression or without counts)."""
    counts: Counter[str] = Counter()
    for reply in kept:
        counts.update(_counts(reply.train_labels))
    total = sum(counts.values())
    return counts.get("1", 0) / total if total else None


# --- resuming a study after a coordinator restart ---------------------------------------------

CHECKPOINT = "checkpoint.json"
#: The files a study writes in its out-dir (a fresh start removes an earlier study's).
STUDY_FILES = ("protocol.json", "handshake.json", "prepare.json", "combat.json", "model.json",
               "nomogram.json", "cnn.json", "cnn_progress.json", "study.json", CHECKPOINT,
               "report.html", "report.json", "report.csv")
#: Run-config keys that do not change a study's results (so a restart may differ in them).
_OPERATIONAL = ("out-dir", "until", "timeout-s", "protocol")


def study_key(settings: StudySettings) -> str:
    """What decides a study's results: the protocol's hash and the other settings."""
    import hashlib
    import json

    config = {k: v for k, v in settings.to_run_config("").items() if k not in _OPERATIONAL}
    text = json.dumps({"protocol": settings.protocol.content_hash(), **config}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Checkpoint:
    """How far a study got: its finished phases, in order, and the last CNN round whose global
    model is saved (``cnn/global_round_<r>.npz``). Written after each phase and each CNN round,
    so a coordinator restarted mid-study goes on from there (:func:`open_checkpoint`)."""

    key: str
    done: list[str] = field(default_factory=list)
    cnn_round: int = 0

    def finished(self, phase: str) -> bool:
        return phase in self.done

    def finish(self, out_dir: Path, phase: str) -> None:
        if phase not in self.done:
            self.done.append(phase)
        self.save(out_dir)

    def save(self, out_dir: Path) -> None:
        from common.provenance import atomic_write_json

        atomic_write_json(out_dir / CHECKPOINT, asdict(self))


def open_checkpoint(settings: StudySettings) -> tuple[Checkpoint, bool]:
    """The checkpoint of this study and whether it resumes one.

    A study resumes when its out-dir holds the checkpoint of an unfinished study (no
    ``study.json`` saying "done") with the same protocol and settings (:func:`study_key`;
    ``until`` and ``timeout-s`` may differ). Otherwise it starts afresh: the files of an earlier
    study in the out-dir are removed, so no stale phase shows in its report.
    """
    import json
    import shutil

    out = settings.out_dir
    key = study_key(settings)
    try:
        saved = json.loads((out / CHECKPOINT).read_text())
        status = json.loads((out / "study.json").read_text()).get("status") \
            if (out / "study.json").exists() else None
        if saved.get("key") == key and status != "done":
            return Checkpoint(key, [str(p) for p in saved.get("done", [])],
                              int(saved.get("cnn_round", 0))), True
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    for name in STUDY_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "cnn", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(key)
    checkpoint.save(out)
    return checkpoint, False


def load_prepare(out_dir: Path) -> PrepareSummary:
    """The local-preparation summary a finished phase 2 wrote (``prepare.json``)."""
    import json

    data = json.loads((out_dir / "prepare.json").read_text())
    sites = [PrepareReply(**{**s, "feature_names": tuple(s.get("feature_names", ()))})
             for s in data["sites"]]
    return PrepareSummary(sites, dict(data["excluded"]), bool(data["go_on"]), str(data["reason"]))
