"""The ComBat design: its options, the design matrix of batches and covariates, and its JSON.

Every site builds the same design from the study's global batches and levels
(:class:`Design`), so the columns of its sums line up with every other site's.
Arrays are samples x features (``(n_samples, n_features)``), float64.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict as dataclasses_asdict
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from common.errors import HarmonizationError

Covariates = Mapping[str, Sequence[object]]
FloatArray: TypeAlias = npt.NDArray[np.float64]
IntArray: TypeAlias = npt.NDArray[np.intp]


@dataclass(frozen=True)
class CombatOptions:
    """How ComBat estimates the batch effects, and the privacy guards.
    ``min_batch_size``: a smaller batch is refused (its estimates would be unstable and its sums
    close to a patient's values). ``min_cell``: at a site, a batch, a categorical level or a
    batch x level cell holding 1 to ``min_cell - 1`` patients is refused, since ``X'Y`` would
    expose them.
    """
    eb: bool = True
    parametric: bool = True
    mean_only: bool = False
    ref_batch: str | None = None
    min_batch_size: int = 10
    min_cell: int = 5
    tolerance: float = 1e-4  # EB iterations stop at this max relative change (neuroCombat)


@dataclass(frozen=True)
class Design:
    """The ComBat design: batch indicators, then categorical indicators (first level dropped),
    then continuous covariates. With a reference batch its indicator column is all ones.

    ``categorical`` pairs a column with its global levels (every site uses the same list; a site
    may lack a level). neuroCombat orders batches and levels by sorting them; so does
    :meth:`from_values`.

    ``fit_only`` names covariates that the *estimation* protects but that are unknown where the
    model is applied, above all the outcome label: where scanners differ in case mix (referral
    pathways send suspected myeloma to one scanner) a batch mean without the label holds part of
    the label's effect, and removing it removes signal. :meth:`CombatModel.transform` does not
    read these columns: their effect stays in the harmonized values (scaled, like the residuals,
    by the batch's 1/sqrt(delta*)), so training and held-out rows are harmonized alike.
    """
    batches: tuple[str, ...]
    categorical: tuple[tuple[str, tuple[str, ...]], ...] = ()
    continuous: tuple[str, ...] = ()
    ref_batch: str | None = None
    fit_only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(set(self.batches)) != len(self.batches) or not self.batches:
            raise HarmonizationError(f"batches must be distinct and at least one: {self.batches}")
        if self.ref_batch is not None and self.ref_batch not in self.batches:
            raise HarmonizationError(
                f"reference batch '{self.ref_batch}' is not one of {list(self.batches)}")
        for column, levels in self.categorical:
            if len(levels) < 2 or len(set(levels)) != len(levels):
                raise HarmonizationError(
                    f"categorical covariate '{column}' needs two or more distinct levels, "
                    f"got {list(levels)}")
        unknown = set(self.fit_only) - {c for c, _ in self.categorical} - set(self.continuous)
        if unknown:
            raise HarmonizationError(f"fit_only names {sorted(unknown)}, which are not "
                                     "covariates of the design")

    @classmethod
    def from_values(cls, batch: Sequence[object], covariates: Covariates,
                    categorical: Sequence[str] = (), continuous: Sequence[str] = (),
                    ref_batch: str | None = None) -> Design:
        """The design of a pooled table: batches and levels as the sorted values present."""
        return cls(tuple(sorted({str(b) for b in batch})),
                   tuple((c, tuple(sorted({str(v) for v in covariates[c]}))) for c in categorical),
                   tuple(continuous), ref_batch)

    @property
    def n_batch(self) -> int:
        return len(self.batches)

    @property
    def n_columns(self) -> int:
        return self.n_batch + sum(len(lv) - 1 for _, lv in self.categorical) + len(
            self.continuous)

    @property
    def ref_index(self) -> int | None:
        return None if self.ref_batch is None else self.batches.index(self.ref_batch)

    def applied(self) -> npt.NDArray[np.bool_]:
        """Which covariate columns (after the batch indicators) :meth:`CombatModel.transform`
        uses: all but those of :attr:`fit_only`, (n_columns - n_batch,) booleans."""
        return np.array([c not in self.fit_only for c, lv in self.categorical
                         for _ in lv[1:]] + [c not in self.fit_only for c in self.continuous],
                        dtype=bool)

    def applied_matrix(self, batch: Sequence[object], covariates: Covariates) -> FloatArray:
        """The covariate columns :meth:`CombatModel.transform` uses, (n_samples, k): the
        :attr:`fit_only` covariates are not read (placeholders fill their columns, dropped)."""
        known = dict(covariates)
        levels = dict(self.categorical)
        for column in self.fit_only:
            known[column] = [levels[column][0] if column in levels else 0.0] * len(batch)
        x: FloatArray = self.matrix(batch, known)[:, self.n_batch:][:, self.applied()]
        return x

    def batch_index(self, batch: Sequence[object]) -> IntArray:
        """Each row's batch as an index into :attr:`batches` (unknown batch: refused)."""
        lookup = {b: i for i, b in enumerate(self.batches)}
        try:
            return np.fromiter((lookup[str(b)] for b in batch), dtype=np.intp, count=len(batch))
        except KeyError as exc:
            raise HarmonizationError(
                f"batch '{exc.args[0]}' is not in the fitted batches {list(self.batches)}"
            ) from None

    def matrix(self, batch: Sequence[object], covariates: Covariates) -> FloatArray:
        """The design matrix, (n_samples, n_columns)."""
        n = len(batch)
        index = self.batch_index(batch)
        blocks = [np.zeros((n, self.n_batch))]
        blocks[0][np.arange(n), index] = 1.0
        if self.ref_index is not None:
            blocks[0][:, self.ref_index] = 1.0
        for column, levels in self.categorical:
            values = [str(v) for v in covariate_column(covariates, column, n)]
            unknown = sorted(set(values) - set(levels))
            if unknown:
                raise HarmonizationError(
                    f"categorical covariate '{column}' has levels {unknown} outside the study's "
                    f"{list(levels)}")
            blocks.append(np.array([[v == level for level in levels[1:]] for v in values],
                                   dtype=float).reshape(n, len(levels) - 1))
        for column in self.continuous:
            try:
                numbers = np.asarray(covariate_column(covariates, column, n), dtype=float)
            except (TypeError, ValueError):
                raise HarmonizationError(
                    f"continuous covariate '{column}' holds non-numeric values") from None
            if not np.all(np.isfinite(numbers)):
                raise HarmonizationError(
                    f"continuous covariate '{column}' holds missing or infinite values")
            blocks.append(numbers.reshape(n, 1))
        return np.hstack(blocks)


def covariate_column(covariates: Covariates, column: str, n: int) -> Sequence[object]:
    """One covariate's values, refused when missing or of another length than the ``n`` rows."""
    if column not in covariates:
        raise HarmonizationError(f"covariate '{column}' is missing")
    values = covariates[column]
    if len(values) != n:
        raise HarmonizationError(f"covariate '{column}' has {len(values)} values for {n} rows")
    return values


def checked_features(y: npt.ArrayLike, where: str) -> FloatArray:
    """``y`` as float64 (n_samples, n_features), refused when not 2-D or not finite."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2:
        raise HarmonizationError(f"{where}: features must be (n_samples, n_features), got shape "
                                 f"{y.shape}")
    if not np.all(np.isfinite(y)):
        raise HarmonizationError(f"{where}: features hold missing or infinite values")
    return y


def design_to_json(design: Design, options: CombatOptions) -> str:
    return json.dumps({"batches": list(design.batches),
                       "categorical": [[c, list(lv)] for c, lv in design.categorical],
                       "continuous": list(design.continuous), "ref_batch": design.ref_batch,
                       "fit_only": list(design.fit_only),
                       "options": dataclasses_asdict(options)})


def design_from_json(text: str) -> tuple[Design, CombatOptions]:
    data = json.loads(text)
    design = Design(tuple(data["batches"]),
                    tuple((c, tuple(lv)) for c, lv in data["categorical"]),
                    tuple(data["continuous"]), data["ref_batch"],
                    tuple(data.get("fit_only", ())))
    return design, CombatOptions(**data["options"])
