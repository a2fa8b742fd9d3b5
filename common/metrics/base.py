"""What the metric modules share: the check of binary labels and their scores, the 95% normal
quantile, NaN for a metric a table cannot compute, and a metric dataclass as a dict."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, ParamSpec, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

FloatArray: TypeAlias = npt.NDArray[np.float64]
P = ParamSpec("P")
R = TypeVar("R")

#: The normal distribution's 97.5% quantile (scipy.stats.norm.ppf(0.975), to the last bit; a
#: literal keeps scipy out of the modules the privacy guard imports in every site process).
Z95 = 1.959963984540054


def checked_binary(y: npt.ArrayLike, score: npt.ArrayLike, what: str
                   ) -> tuple[FloatArray, FloatArray]:
    """Labels and scores as 1-D float arrays of one length, labels 0 or 1, scores finite;
    ``what`` names the metric in the error."""
    y = np.asarray(y, dtype=float).ravel()
    score = np.asarray(score, dtype=float).ravel()
    if y.shape != score.shape:
        raise ValueError(f"{what}: {len(y)} labels for {len(score)} scores")
    if not np.all(np.isin(y, (0.0, 1.0))):
        raise ValueError(f"{what}: labels must be 0 or 1")
    if not np.all(np.isfinite(score)):
        raise ValueError(f"{what}: scores hold missing or infinite values")
    return y, score


#: What a table reports for a metric it cannot compute (e.g. AUC with one class).
NAN = float("nan")


def nan_if_fails(compute: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R | None:
    """``compute(*args, **kwargs)``, or None where it refuses its input (ValueError)."""
    try:
        return compute(*args, **kwargs)
    except ValueError:
        return None


def as_dict(value: DataclassInstance) -> dict[str, object]:
    """A metric dataclass as a JSON-ready dict."""
    return asdict(value)
