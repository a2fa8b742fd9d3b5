"""How much of the scanners' leave-one-site-out (LOSO) drop each harmonization step recovers,
averaged over many train/test splits and over cohorts drawn with other seeds and site sizes.

One study split gives 12 to 33 test patients a site, too few for a stable AUC (``bench/study.py``
prints one table per seed). For each cohort (``--cohorts SEED:SIZES``, the default one and two
more) this benchmark writes the cohort with and without scanner effects, extracts each under
every image-level variant of the study protocol (``--images``: the images as acquired; with
federated histogram standardization; with it and federated resolution matching, noise matching,
or both (``standardization.matching``); each extraction
runs the study's own phases up to ``prepare`` in Flower's simulation engine, so the image
statistics are the federated ones), then for ``--splits`` stratified random splits runs the
study's recipe in-process (the pooled fit equals the federated one to 1e-6:
``tests/common/test_selection.py``) under every feature-level step:

* ``raw``: no feature harmonization;
* ``ComBat``: federated ComBat as the study runs it (age and the outcome protected);
* ``ComBat + CovBat``: CovBat (:mod:`harmonization.covbat`) on ComBat's residuals, the leading
  components explaining 95% of their variance, the outcome still protected;
* ``ComBat + screening``: then scanner-robust screening (:mod:`harmonization.screening`) drops
  the features whose outcome effect differs between the *training* sites' scanners (the left-out
  site takes no part), before the model's own screening;
* ``Harmony``, ``ComBat + Harmony``: federated Harmony (:mod:`harmonization.federated_harmony`)
  on the leading principal components of the standardized features (95% of the training rows'
  variance, at most 30), every row of every site taking part (Harmony is unsupervised and has
  no transform for new rows), each row's correction mapped back to the features. Harmony
  protects no covariate, so where the scanners differ in their outcome mix it removes outcome
  signal with the scanner;
* ``oracle location-scale``: per-scanner location and scale fitted on every row, training and
  test, with the label protected and no shrinkage (the most any location-scale harmonization
  could do here).

It prints the LOSO AUC per site and the share of the drop (no scanner effects against images as
acquired, raw features) each combination recovers, per cohort and their mean; the share of
features that still differ between a site's own scanners (``scanner features``: Kruskal-Wallis
p < 0.05 on each feature less its class mean, mean over the two-scanner sites); and per site the
local-only model's and the federated model's test AUC (how often federated wins).

    python bench/loso_harmonization.py [--splits 8] [--cohorts 0:40,70,110 ...]
                                       [--images VARIANT ...] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.simulation import run_in_simulation  # noqa: E402
from client.workspace import PREPARED_FILE, feature_columns  # noqa: E402
from common.protocol import StudyProtocol, load_protocol  # noqa: E402
from common.selection.pooled import fit_pooled  # noqa: E402
from common.selection.terms import assign_folds  # noqa: E402
from common.synthetic import CohortSpec, make_sites, read_cohort_spec, write_cohort  # noqa: E402
from harmonization.combat.design import CombatOptions, Design  # noqa: E402
from harmonization.combat.model import SiteTable, fit_combat  # noqa: E402
from harmonization.covbat import fit_covbat  # noqa: E402
from harmonization.diagnostics import scanner_effect  # noqa: E402
from harmonization.federated_harmony import FederatedHarmonyOptions  # noqa: E402
from harmonization.harmony_server import federated_harmony  # noqa: E402
from harmonization.screening import scanner_shares, site_interaction_moments  # noqa: E402
from server.phases.images import IMAGES_FILE  # noqa: E402
from server.study import StudySettings  # noqa: E402

FEATURE_STEPS = ("raw", "ComBat", "ComBat + CovBat", "ComBat + screening", "Harmony",
                 "ComBat + Harmony", "oracle location-scale")
#: Harmony's principal components: the fewest explaining this share of the training rows'
#: variance (standardized features), at most ``HARMONY_MAX_PCS``.
HARMONY_VARIANCE = 0.95
HARMONY_MAX_PCS = 30
DEFAULT_COHORTS = ("0:40,70,110", "1:60,60,90", "2:50,80,100")
#: The screening's threshold in the benchmark: the F test's p-value below which a feature's
#: outcome effect is taken to differ between scanners.
SCREENING_P = 0.05


def _without_histogram(mapping: dict) -> dict:
    mapping["standardization"]["histogram"] = None
    mapping["standardization"]["matching"] = None
    return mapping


def _with_histogram(mapping: dict) -> dict:
    mapping["standardization"]["histogram"] = {"scale": 250.0}
    mapping["standardization"]["matching"] = None
    return mapping


def _matching(noise: bool, resolution: bool) -> Callable[[dict], dict]:
    def edit(mapping: dict) -> dict:
        mapping = _with_histogram(mapping)
        mapping["standardization"]["matching"] = {"noise": noise, "resolution": resolution}
        return mapping
    return edit


#: Each image-level variant as an edit of the study protocol's mapping.
IMAGE_VARIANTS: dict[str, Callable[[dict], dict]] = {
    "as acquired": _without_histogram,
    "histogram standardization": _with_histogram,
    "histogram + resolution matching": _matching(False, True),
    "histogram + noise matching": _matching(True, False),
    "histogram + resolution and noise matching": _matching(True, True),
}


@dataclass(frozen=True)
class Cohort:
    seed: int
    sizes: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> Cohort:
        seed, _, sizes = text.partition(":")
        return cls(int(seed), tuple(int(s) for s in sizes.split(",")))

    @property
    def name(self) -> str:
        return f"seed {self.seed}, sites of {'/'.join(map(str, self.sizes))}"


def prepared(cohort: Path, variant: str, edit: Callable[[dict], dict]
             ) -> dict[str, pd.DataFrame]:
    """Each site's prepared table (features, label, batch) under a protocol variant, running
    the study's phases up to ``prepare`` when needed."""
    mapping = edit(yaml.safe_load((cohort / "study.yaml").read_text()))
    path = cohort.parent / f"{cohort.name}-{variant.replace(' ', '-')}.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    protocol = load_protocol(path)
    out = cohort.parent / f"{cohort.name}-{variant.replace(' ', '-')}-prepare"
    run_in_simulation(cohort, StudySettings(protocol, out, until="prepare"), lambda _: None)
    # a site that missed a phase (a reply late on a loaded machine) changes the study's image
    # standard or drops its rows: the benchmark would then measure another cohort
    left_out = {phase: json.loads(path.read_text()).get(key)
                for phase, path, key in (("images", out / IMAGES_FILE, "missing"),
                                         ("prepare", out / "prepare.json", "excluded"))
                if path.exists()}
    if any(left_out.values()):
        raise SystemExit(f"{cohort}: a site missed a phase of the preparation ({left_out}); "
                         "run the benchmark again on a less loaded machine")
    return {p.name: pd.read_parquet(p / "study" / protocol.short_hash / PREPARED_FILE)
            for p in sorted((cohort / "work").iterdir())}


def split(labels: np.ndarray, seed: int, fraction: float = 0.3) -> np.ndarray:
    """A stratified random test mask."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for value in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == value))
        test[rows[: int(round(fraction * len(rows)))]] = True
    return test


def _design(tables: dict[str, pd.DataFrame], label: str) -> Design:
    """The study's ComBat design: age, and the outcome protected while estimating."""
    batches = tuple(sorted({b for t in tables.values() for b in t.batch.astype(str)}))
    return Design(batches, ((label, ("0", "1")),), ("age",), fit_only=(label,))


def harmonize(tables: dict[str, pd.DataFrame], tests: dict[str, np.ndarray], names: list[str],
              label: str, step: str, seed: int = 0) -> dict[str, np.ndarray]:
    if step.endswith("Harmony"):
        before = harmonize(tables, tests, names, label, step.removesuffix("Harmony")
                           .removesuffix(" + ") or "raw")
        return harmony_features(tables, tests, before, seed)
    x = {s: t[names].to_numpy(float) for s, t in tables.items()}
    if step == "raw":
        return x
    oracle = step.startswith("oracle")
    design = _design(tables, label)
    options = CombatOptions(min_batch_size=5, min_cell=1, eb=not oracle)
    sites = []
    for s, t in tables.items():
        rows = np.ones(len(t), bool) if oracle else ~tests[s]
        fit = t[rows]
        sites.append(SiteTable(s, x[s][rows], fit.batch.astype(str).tolist(),
                               {"age": fit.age.tolist(), label: fit[label].astype(int).tolist()}))
    model = (fit_covbat(sites, design, options) if step == "ComBat + CovBat" else
             fit_combat(sites, design, options))
    return {s: model.transform(x[s], t.batch.astype(str).tolist(), {"age": t.age.tolist()})
            for s, t in tables.items()}


def harmony_features(tables: dict[str, pd.DataFrame], tests: dict[str, np.ndarray],
                     x: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Federated Harmony (:mod:`harmonization.federated_harmony`) on the features' leading
    principal components, mapped back: the features standardized with the training rows' mean
    and SD, their components from the training rows (what the sites' pooled sums give), then
    Harmony over every row of every site by scanner (unsupervised: no label, so the test rows
    take part, as Harmony has no transform for new rows) and each row's correction added back
    in feature space."""
    train = np.vstack([x[s][~tests[s]] for s in tables])
    mean, sd = train.mean(axis=0), train.std(axis=0)
    sd[sd == 0] = 1.0
    eigenvalues, vectors = np.linalg.eigh(np.cov(((train - mean) / sd).T))
    order = np.argsort(eigenvalues)[::-1]
    share = np.cumsum(eigenvalues[order]) / eigenvalues.sum()
    n_pc = min(int(np.searchsorted(share, HARMONY_VARIANCE)) + 1, HARMONY_MAX_PCS)
    axes = vectors[:, order[:n_pc]]
    scores = {s: ((x[s] - mean) / sd) @ axes for s in tables}
    batches = [t.batch.astype(str).to_numpy() for t in tables.values()]
    result = federated_harmony(list(scores.values()), batches, FederatedHarmonyOptions(seed=seed))
    return {s: x[s] + ((c - scores[s]) @ axes.T) * sd
            for s, c in zip(tables, result.corrected, strict=True)}


def robust(tables: dict[str, pd.DataFrame], tests: dict[str, np.ndarray],
           x: dict[str, np.ndarray], label: str, sites: list[str]) -> np.ndarray:
    """The features the screening keeps, from the training rows of ``sites`` only."""
    design = _design({s: tables[s] for s in sites}, label)
    parts = []
    for s in sites:
        t, train = tables[s], ~tests[s]
        parts.append(site_interaction_moments(
            x[s][train], t.batch.astype(str)[train].tolist(), t[label].to_numpy(float)[train],
            {"age": t.age[train].tolist()}, design))
    return scanner_shares(parts, design).p >= SCREENING_P


def within_site_scanner_effect(tables: dict[str, pd.DataFrame], x: dict[str, np.ndarray],
                               label: str) -> dict[str, float]:
    """At each site with two scanners or more, the share of features that still differ between
    them (Kruskal-Wallis p < 0.05, the site report's diagnostic) on all its rows, each feature
    less its class mean (the referral pathway sends more myeloma to one scanner)."""
    out = {}
    for s, t in tables.items():
        if t.batch.nunique() < 2:
            continue
        out[s] = scanner_effect(x[s], t.batch.astype(str).tolist(),
                                t[label].to_numpy()).share_significant
    return out


def fit(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], spec):  # noqa: ANN001, ANN201
    model, _ = fit_pooled(rows, "logistic", spec.penalty, spec.screening_top_k, spec.n_lambdas,
                          spec.cv_folds, spec.lambda_rule)
    return model


def evaluate(tables: dict[str, pd.DataFrame], names: list[str], protocol: StudyProtocol,
             r: int, steps: tuple[str, ...], versus: bool
             ) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """LOSO AUC per site under each feature step for split ``r`` (and, with ``versus``,
    local-only against federated)."""
    label, spec = protocol.task.label_column, protocol.model
    tests = {s: split(t[label].to_numpy(), 1000 * r + i) for i, (s, t) in enumerate(tables.items())}
    loso, duel = [], []
    for step in steps:
        x = harmonize(tables, tests, names, label, step.removesuffix(" + screening"), r)
        within = within_site_scanner_effect(tables, x, label)
        rows = {s: (x[s][~tests[s]], t[label].to_numpy(float)[~tests[s]],
                    assign_folds(t[label].to_numpy(float)[~tests[s]], spec.cv_folds, r, True))
                for s, t in tables.items()}
        for k, t in tables.items():
            others = [s for s in tables if s != k]
            keep = (robust(tables, tests, x, label, others) if step.endswith("screening")
                    else np.ones(len(names), bool))
            y = t[label].to_numpy(float)[tests[k]]
            model = fit([(rows[s][0][:, keep], *rows[s][1:]) for s in others], spec)
            loso.append({"split": r, "step": step, "site": k, "kept": int(keep.sum()),
                         "auc": roc_auc_score(y, model.score(x[k][tests[k]][:, keep])),
                         "scanner features": within.get(k, np.nan)})
        if versus and step in ("raw", "ComBat"):
            federated = fit(list(rows.values()), spec)
            for k, t in tables.items():
                y = t[label].to_numpy(float)[tests[k]]
                duel.append({
                    "split": r, "features": step, "site": k,
                    "local": roc_auc_score(y, fit([rows[k]], spec).score(x[k][tests[k]])),
                    "federated": roc_auc_score(y, federated.score(x[k][tests[k]]))})
    return loso, duel


def cohort_dirs(work: Path, cohort: Cohort) -> dict[bool, Path]:
    """The cohort with scanner effects (True) and without (False), written when absent."""
    dirs = {}
    for effects in (True, False):
        path = work / f"seed{cohort.seed}-{'-'.join(map(str, cohort.sizes))}" / (
            "scanners" if effects else "no-scanners")
        if read_cohort_spec(path) is None:
            write_cohort(path, CohortSpec(make_sites(cohort.sizes, effects, cohort.seed),
                                          seed=cohort.seed, scanner_effects=effects))
        dirs[effects] = path
    return dirs


def cohort_arguments(doc: str | None, name: str,
                     parser: argparse.ArgumentParser | None = None
                     ) -> tuple[argparse.Namespace, Path]:
    """The command line of a benchmark over cohorts and splits (``--splits``, ``--cohorts``,
    ``--work``, and what ``parser`` adds), and its work folder (a new temporary one without
    ``--work``)."""
    parser = parser or argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--splits", type=int, default=8)
    parser.add_argument("--cohorts", nargs="+", default=list(DEFAULT_COHORTS),
                        help="SEED:SIZES, e.g. 0:40,70,110 (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the cohorts here (reused when present)")
    args = parser.parse_args()
    return args, args.work or Path(tempfile.mkdtemp(prefix=f"myelofed-bench-{name}-"))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--images", nargs="+", default=list(IMAGE_VARIANTS),
                        choices=list(IMAGE_VARIANTS),
                        help="the image-level variants (default: all; 'as acquired' is always "
                             "run, the drop is measured from it)")
    args, work = cohort_arguments(__doc__, "loso", parser)
    variants = ["as acquired", *[v for v in args.images if v != "as acquired"]]
    start = time.perf_counter()
    results, duels = [], []
    for cohort in map(Cohort.parse, args.cohorts):
        dirs = cohort_dirs(work, cohort)
        protocol = load_protocol(dirs[True] / "study.yaml")
        sets = {"no scanner effects": prepared(dirs[False], "as acquired", _without_histogram)}
        for variant in variants:
            sets[variant] = prepared(dirs[True], variant, IMAGE_VARIANTS[variant])
        for r in range(args.splits):
            for images, tables in sets.items():
                names = feature_columns(next(iter(tables.values())), protocol)
                steps = ("raw",) if images == "no scanner effects" else FEATURE_STEPS
                loso, duel = evaluate(tables, names, protocol, r, steps,
                                      images == "as acquired")
                results += [{**row, "cohort": cohort.name, "images": images} for row in loso]
                duels += [{**row, "cohort": cohort.name} for row in duel]
        report(pd.DataFrame(results), pd.DataFrame(duels), args.splits)
    print(f"\n{time.perf_counter() - start:.0f} s; cohorts under {work}")


def report(results: pd.DataFrame, duels: pd.DataFrame, splits: int) -> None:
    """The LOSO table per cohort, the share recovered, and the local-vs-federated duel."""
    table = results.pivot_table(index=["images", "step"], columns=["cohort", "site"],
                                values="auc")
    shares = {}
    for cohort in results.cohort.unique():
        mean = table[cohort].mean(axis=1)
        none = mean.loc[("no scanner effects", "raw")]
        raw = mean.loc[("as acquired", "raw")]
        shares[cohort] = (mean - raw) / (none - raw)
        print(f"\n{cohort}: LOSO test AUC, mean over {splits} splits (drop {none - raw:.3f})")
        out = table[cohort].copy()
        out["mean"] = mean
        out["recovered"] = shares[cohort]
        mine = results[results.cohort == cohort].groupby(["images", "step"])
        out["features kept"] = mine.kept.mean()
        out["scanner features"] = mine["scanner features"].mean()
        print(out.to_string(float_format=lambda v: f"{v:.3f}"))
    if len(shares) > 1:
        summary = pd.DataFrame(shares)
        summary["mean"] = summary.mean(axis=1)
        print("\nshare of the LOSO drop recovered, per cohort (goal: >= 50% on each with the "
              "study's default harmonization)")
        print(summary.to_string(float_format=lambda v: f"{v:.0%}"))
    duels["federated wins"] = duels.federated > duels.local
    print(f"\nlocal-only vs federated test AUC per site, mean over {splits} splits, images as "
          "acquired")
    print(duels.groupby(["cohort", "features", "site"])[["local", "federated", "federated wins"]]
          .mean().to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
