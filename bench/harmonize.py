"""Benchmark: federated ComBat (site and server halves, in-process) against neuroCombat.

4 sites x 500 patients x 1,000 features (one scanner per site, sex and age preserved) by default.
Prints the wall time of each (fit + harmonizing every row), the ratio federated / neuroCombat
(goal <= 2x), the largest difference between the two outputs, and the bytes each site sends
(the arrays of its round 1-3 payloads: nothing is indexed by patient).

    python bench/harmonize.py [--sites 4] [--patients 500] [--features 1000] [--nonparametric]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harmonization.combat.design import CombatOptions, Design  # noqa: E402
from harmonization.combat.model import SiteTable, fit_combat  # noqa: E402
from harmonization.combat.moments import (  # noqa: E402
    LocationFit,
    site_batch_moments,
    site_design_moments,
    site_residual_moments,
    standardize,
)


def make_sites(n_sites: int, n: int, f: int, seed: int = 0) -> list[SiteTable]:
    rng = np.random.default_rng(seed)
    base = rng.normal(10, 2, f)
    sites = []
    for k in range(n_sites):
        sex = rng.choice(["F", "M"], n)
        age = rng.integers(40, 85, n).astype(float)
        y = (base + rng.normal(0, 1, f) + 0.03 * age[:, None] + 0.5 * (sex == "M")[:, None]
             + rng.normal(0, 1, (n, f)) * rng.uniform(0.5, 2, f))
        sites.append(SiteTable(f"site{k}", y, [f"scanner{k}"] * n,
                               {"sex": sex.tolist(), "age": age.tolist()}))
    return sites


def payload_bytes(payload: object) -> int:
    return sum(v.nbytes for v in (getattr(payload, x.name) for x in dataclasses.fields(payload))
               if isinstance(v, np.ndarray))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--patients", type=int, default=500)
    parser.add_argument("--features", type=int, default=1000)
    parser.add_argument("--nonparametric", action="store_true")
    args = parser.parse_args()
    import neuroCombat

    sites = make_sites(args.sites, args.patients, args.features)
    y = np.vstack([s.features for s in sites])
    batch = [b for s in sites for b in s.batch]
    covars = {c: [v for s in sites for v in s.covariates[c]] for c in ("sex", "age")}
    design = Design.from_values(batch, covars, ("sex",), ("age",))
    options = CombatOptions(parametric=not args.nonparametric)

    start = time.perf_counter()
    model = fit_combat(sites, design, options)
    ours = np.vstack([model.transform(s.features, s.batch, s.covariates) for s in sites])
    t_ours = time.perf_counter() - start

    frame = pd.DataFrame({"batch": batch, **covars})
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), np.errstate(all="ignore"):
        reference = neuroCombat.neuroCombat(
            dat=y.T.copy(), covars=frame, batch_col="batch", categorical_cols=["sex"],
            continuous_cols=["age"], parametric=not args.nonparametric)["data"].T
    t_ref = time.perf_counter() - start

    location = LocationFit(model.beta, model.grand_mean, model.batch_counts)
    site = sites[0]
    z = standardize(site.features, site.batch, site.covariates, design, location,
                    model.var_pooled)
    sent = {
        "round 1 (n, X'X, X'Y)": payload_bytes(site_design_moments(
            site.features, site.batch, site.covariates, design, options, site.name)),
        "round 2 (per-batch RSS)": payload_bytes(site_residual_moments(
            site.features, site.batch, site.covariates, design, location)),
        "round 3 (per-batch n, mean, M2; only for a batch shared between sites)": sum(
            payload_bytes(m) for m in site_batch_moments(z, site.batch, design).values()),
    }
    mode = "non-parametric" if args.nonparametric else "parametric"
    print(f"{args.sites} sites x {args.patients} patients x {args.features} features, "
          f"{mode} EB")
    print(f"federated (in-process): {t_ours:7.2f} s")
    print(f"neuroCombat 0.2.12:     {t_ref:7.2f} s")
    print(f"ratio federated / neuroCombat: {t_ours / t_ref:.2f}x (goal <= 2x)")
    bad = ~np.isfinite(reference)
    if bad.any():
        print(f"neuroCombat returned {bad.mean():.0%} non-finite values (its likelihoods "
              f"underflow for large batches); ours: {(~np.isfinite(ours)).mean():.0%}")
    good = ~bad.any(axis=0)
    if good.any():
        difference = np.abs(ours - reference)[:, good] / y.std(axis=0)[good]
        print(f"max |difference| / feature SD (finite features): {difference.max():.1e}")
    data_bytes = site.features.nbytes
    for what, size in sent.items():
        print(f"site sends, {what}: {size / 1024:.1f} KiB")
    print(f"(its feature table is {data_bytes / 1024:.0f} KiB and never leaves it)")


if __name__ == "__main__":
    main()
