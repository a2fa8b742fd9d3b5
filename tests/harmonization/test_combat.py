from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from common.errors import HarmonizationError
from harmonization.combat.design import CombatOptions, Design
from harmonization.combat.model import SiteTable, fit_combat
from harmonization.combat.moments import (
    BatchMoments,
    LocationFit,
    combine_batch_moments,
    site_batch_moments,
    site_design_moments,
    site_residual_moments,
    standardize,
)

neuroCombat = pytest.importorskip("neuroCombat", reason="neuroCombat 0.2.12 is a test dependency")


def make_table(seed: int, n_features: int = 25, sample_seed: int | None = None
               ) -> tuple[list[SiteTable], pd.DataFrame, np.ndarray]:
    """Three sites, four scanners (b1 is shared by sites A and B), sex and stage preserved, age
    continuous; site C has 8 patients and no stage III. The scanner effects come from ``seed``,
    the patients from ``sample_seed`` (default: ``seed``). Returns the sites, the pooled
    covariates and the pooled features."""
    effects = np.random.default_rng([seed, 1])
    rng = np.random.default_rng(seed if sample_seed is None else sample_seed)
    layout = [("A", "b0", 30), ("A", "b1", 14), ("B", "b1", 16), ("B", "b2", 40), ("C", "b3", 8)]
    rows = []
    for site, batch, n in layout:
        # levels dealt evenly within each scanner, so no cell falls below min_cell = 3
        stages = ["I", "II"] if site == "C" else ["I", "II", "III"]
        sex = rng.permutation([("F", "M")[i % 2] for i in range(n)])
        stage = rng.permutation([stages[i % len(stages)] for i in range(n)])
        for i in range(n):
            rows.append({"site": site, "batch": batch, "sex": str(sex[i]), "stage": str(stage[i]),
                         "age": float(rng.integers(40, 85))})
    covars = pd.DataFrame(rows)
    n = len(covars)
    shift = {b: effects.normal(0, 1.0, n_features) for b in ("b0", "b1", "b2", "b3")}
    scale = {b: effects.uniform(0.5, 2.0, n_features) for b in ("b0", "b1", "b2", "b3")}
    base = effects.normal(10, 2, n_features)
    stage_effect = {"I": 0.0, "II": 0.8, "III": 1.6}
    y = np.empty((n, n_features))
    for i, r in covars.iterrows():
        signal = (base + 0.03 * r.age + 0.5 * (r.sex == "M") + stage_effect[r.stage]
                  + rng.normal(0, 1, n_features) * scale[r.batch])
        y[i] = signal + shift[r.batch]
    sites = []
    for site, group in covars.groupby("site"):
        idx = group.index.to_numpy()
        sites.append(SiteTable(site, y[idx], group.batch.tolist(),
                               {c: group[c].tolist() for c in ("sex", "stage", "age")}))
    return sites, covars, y


def _design(covars: pd.DataFrame, ref: str | None) -> Design:
    return Design.from_values(covars.batch, covars, ("sex", "stage"), ("age",), ref)


def _reference(covars: pd.DataFrame, y: np.ndarray, ref: str | None, **kw: bool) -> np.ndarray:
    if ref is not None and not hasattr(np, "int"):
        np.int = int  # neuroCombat uses np.int for ref_batch, gone since NumPy 1.24
    frame = covars[["batch", "sex", "stage", "age"]].copy()
    out = neuroCombat.neuroCombat(dat=y.T.copy(), covars=frame, batch_col="batch",
                                  categorical_cols=["sex", "stage"], continuous_cols=["age"],
                                  ref_batch=ref, **kw)
    return out["data"].T


def _ours(sites: list[SiteTable], covars: pd.DataFrame, ref: str | None,
          **kw: bool) -> np.ndarray:
    options = CombatOptions(ref_batch=ref, min_batch_size=8, min_cell=3, **kw)
    model = fit_combat(sites, _design(covars, ref), options)
    out = np.empty((len(covars), sites[0].features.shape[1]))
    for site in sites:
        idx = covars.index[covars.site == site.name].to_numpy()
        out[idx] = model.transform(site.features, site.batch, site.covariates)
    return out


MODES = [
    dict(eb=True, parametric=True, mean_only=False),
    dict(eb=True, parametric=False, mean_only=False),
    dict(eb=True, parametric=True, mean_only=True),
    dict(eb=True, parametric=False, mean_only=True),
    dict(eb=False, parametric=True, mean_only=False),
]


@pytest.mark.parametrize("ref", [None, "b1"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(k for k, v in m.items() if v))
@pytest.mark.parametrize("seed", [0, 1])
def test_federated_equals_neurocombat(seed: int, mode: dict, ref: str | None):
    sites, covars, y = make_table(seed)
    expected = _reference(covars, y, ref, **mode)
    got = _ours(sites, covars, ref, **mode)
    tolerance = 1e-8 * y.std(axis=0)
    assert np.all(np.abs(got - expected) <= tolerance), np.max(np.abs(got - expected) / tolerance)
    if ref is not None:  # the reference batch's rows are untouched
        keep = (covars.batch == ref).to_numpy()
        np.testing.assert_array_equal(got[keep], y[keep])


def test_federated_equals_pooled():
    sites, covars, y = make_table(3)
    pooled = [SiteTable("all", y, covars.batch.tolist(),
                        {c: covars[c].tolist() for c in ("sex", "stage", "age")})]
    options = CombatOptions(min_batch_size=8, min_cell=3)
    design = _design(covars, None)
    fed, central = fit_combat(sites, design, options), fit_combat(pooled, design, options)
    for name in ("beta", "grand_mean", "var_pooled", "gamma", "delta"):
        np.testing.assert_allclose(getattr(fed, name), getattr(central, name), rtol=1e-10,
                                   atol=1e-12, err_msg=name)


def test_batch_moments_of_a_shared_batch_combine_exactly():
    rng = np.random.default_rng(0)
    rows = rng.normal(3, 2, (50, 7))
    design = Design(("b",))
    whole = site_batch_moments(rows, ["b"] * 50, design)["b"]
    parts = [site_batch_moments(rows[a:b], ["b"] * (b - a), design)["b"]
             for a, b in ((0, 11), (11, 30), (30, 50))]
    combined = combine_batch_moments(parts)
    assert combined.n == 50
    np.testing.assert_allclose(combined.mean, whole.mean, rtol=1e-13)
    np.testing.assert_allclose(combined.m2, whole.m2, rtol=1e-12)


def test_site_halves_never_send_a_per_patient_dimension():
    sites, covars, _ = make_table(4, n_features=9)
    design = Design.from_values(covars.batch, covars, ("sex", "stage"))  # 7 columns
    options = CombatOptions(min_batch_size=8, min_cell=3)
    model = fit_combat(sites, design, options)
    location = LocationFit(model.beta, model.grand_mean, model.batch_counts)
    for site in sites:
        sent = [site_design_moments(site.features, site.batch, site.covariates, design, options,
                                    site.name),
                site_residual_moments(site.features, site.batch, site.covariates, design,
                                      location)]
        z = standardize(site.features, site.batch, site.covariates, design, location,
                        model.var_pooled)
        sent += list(site_batch_moments(z, site.batch, design).values())
        allowed = {design.n_columns, design.n_batch, site.features.shape[1]}
        assert len(site.batch) not in allowed  # else the check below could not tell them apart
        for payload in sent:
            for item in dataclasses.fields(payload):
                value = getattr(payload, item.name)
                if isinstance(value, np.ndarray):
                    assert set(value.shape) <= allowed, (type(payload).__name__, item.name,
                                                         value.shape)


def test_held_out_rows_are_harmonized_row_by_row_and_lose_their_batch_shift():
    sites, covars, _ = make_table(5)
    model = fit_combat(sites, _design(covars, None), CombatOptions(min_batch_size=8, min_cell=3))
    _, new_covars, new_y = make_table(5, sample_seed=105)  # new patients, the same scanners
    batch = new_covars.batch.tolist()
    cov = {c: new_covars[c].tolist() for c in ("sex", "stage", "age")}
    out = model.transform(new_y, batch, cov)
    first = model.transform(new_y[:5], batch[:5], {c: v[:5] for c, v in cov.items()})
    np.testing.assert_allclose(first, out[:5], rtol=1e-12)  # a row's result is its own

    def spread(values: np.ndarray) -> float:  # SD of the batch means, averaged over features
        return float(pd.DataFrame(values).groupby(new_covars.batch.to_numpy()).mean().std().mean())

    assert spread(out) < 0.5 * spread(new_y)


def test_refusals_name_the_batch_cell_or_level():
    sites, covars, _ = make_table(6)
    design = _design(covars, None)
    with pytest.raises(HarmonizationError, match="batch 'b3' has 8 training patients"):
        fit_combat(sites, design, CombatOptions(min_cell=3))  # default min_batch_size 10
    with pytest.raises(HarmonizationError, match=r"site '[ABC]'.*fewer than min_cell = 5"):
        fit_combat(sites, design, CombatOptions(min_batch_size=8, min_cell=5))
    model = fit_combat(sites, design, CombatOptions(min_batch_size=8, min_cell=3))
    site = sites[0]
    with pytest.raises(HarmonizationError, match="batch 'b9' is not in the fitted batches"):
        model.transform(site.features[:1], ["b9"], {c: v[:1] for c, v in site.covariates.items()})
    bad = {**{c: v[:1] for c, v in site.covariates.items()}, "stage": ["IV"]}
    with pytest.raises(HarmonizationError, match=r"'stage' has levels \['IV'\]"):
        model.transform(site.features[:1], site.batch[:1], bad)
    lonely = Design(design.batches, (("sex", ("F", "M", "X")),), ())
    with pytest.raises(HarmonizationError, match="singular"):
        fit_combat(sites, lonely, CombatOptions(min_batch_size=8, min_cell=3))
    with pytest.raises(HarmonizationError, match="reference batch 'zz'"):
        Design(("a", "b"), ref_batch="zz")


def test_one_patient_cell_is_refused_before_anything_is_sent():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(12, 4))
    design = Design(("b0",), (("sex", ("F", "M")),))
    with pytest.raises(HarmonizationError, match=r"'sex' = 'F' holds fewer than min_cell") as e:
        site_design_moments(y, ["b0"] * 12, {"sex": ["F"] + ["M"] * 11}, design,
                            CombatOptions(), "S")
    assert "1" not in str(e.value)  # the reason leaves the site: it names no count under 5


def test_moments_alone_drive_the_eb_step():
    # sum((s - g)^2) = m2 + n (mean - g)^2 : moments of rows equal the rows' own sums
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(20, 3))
    m = site_batch_moments(rows, ["x"] * 20, Design(("x",)))["x"]
    g = rng.normal(size=3)
    np.testing.assert_allclose(m.m2 + m.n * (m.mean - g) ** 2, ((rows - g) ** 2).sum(axis=0),
                               rtol=1e-12)
    assert isinstance(m, BatchMoments)


def test_outcome_protected_in_the_estimation_keeps_a_confounded_label_effect():
    """Referral: 80 % positives on scanner b1, 20 % on b0. Plain ComBat takes the label's share
    of b1's mean for a scanner effect and removes it; with the label protected in the estimation
    (neuroCombat's estimates with the label as a covariate) the scanner shift goes and the label
    effect stays, and harmonizing a row does not need its label."""
    rng = np.random.default_rng(7)
    n, f = 160, 20
    batch = np.array(["b0"] * 80 + ["b1"] * 80)
    label = (rng.random(n) < np.where(batch == "b1", 0.8, 0.2)).astype(int)
    effect = rng.uniform(0.8, 1.2, f)
    y = (10 + np.outer(label, effect) + np.where(batch == "b1", 1.5, -1.0)[:, None]
         + rng.normal(0, 1, (n, f)) * np.where(batch == "b1", 1.3, 0.8)[:, None])
    options = CombatOptions(min_batch_size=8, min_cell=3)
    plain = fit_combat([SiteTable("s", y, batch.tolist(), {})], Design(("b0", "b1")), options)
    design = Design(("b0", "b1"), (("label", ("0", "1")),), fit_only=("label",))
    protected = fit_combat([SiteTable("s", y, batch.tolist(), {"label": label.tolist()})],
                           design, options)

    reference = neuroCombat.neuroCombat(
        dat=y.T.copy(), covars=pd.DataFrame({"batch": batch, "label": label}), batch_col="batch",
        categorical_cols=["label"])["estimates"]
    np.testing.assert_allclose(protected.gamma, reference["gamma.star"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(protected.delta, reference["delta.star"], rtol=1e-6)
    np.testing.assert_allclose(protected.var_pooled, reference["var.pooled"].ravel(), rtol=1e-9)

    def label_effect(h: np.ndarray) -> float:
        return float((h[label == 1].mean(0) - h[label == 0].mean(0)).mean())

    def scanner_shift(h: np.ndarray) -> float:  # within each label, b1 minus b0
        return float(np.mean([(h[(batch == "b1") & (label == k)].mean(0)
                               - h[(batch == "b0") & (label == k)].mean(0)).mean()
                              for k in (0, 1)]))

    h_plain = plain.transform(y, batch.tolist(), {})
    h_protected = protected.transform(y, batch.tolist(), {})  # no label needed
    assert abs(scanner_shift(y)) > 2.0
    assert abs(scanner_shift(h_protected)) < 0.3
    assert label_effect(h_protected) == pytest.approx(effect.mean(), abs=0.2)
    assert label_effect(h_plain) < 0.75 * effect.mean()  # the confounded share went with b1
    # the label's values are not read: any placeholder gives the same rows
    np.testing.assert_array_equal(
        h_protected, protected.transform(y, batch.tolist(), {"label": [1] * n}))
    with pytest.raises(HarmonizationError, match="fit_only names \\['stage'\\]"):
        Design(("b0", "b1"), fit_only=("stage",))
