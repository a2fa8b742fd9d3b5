"""A fitted linear predictor as it travels between the server and the sites."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypeAlias

import numpy as np
import numpy.typing as npt

from common.glm import ModelError

FloatArray: TypeAlias = npt.NDArray[np.float64]
IndexArray: TypeAlias = npt.NDArray[np.int64]  # feature indices, fold numbers


@dataclass(frozen=True)
class LinearModel:
    """A fitted model: ``beta[0] + sum_j beta[1 + j] * (x[:, features[j]] - mean[j]) / sd[j]``
    (a logit for classification, the value for regression)."""

    features: IndexArray
    mean: FloatArray
    sd: FloatArray
    beta: FloatArray

    #: A site's local-only model: ``terms`` up to the protocol's screening_top_k.
    AXES: ClassVar = {"features": ("terms",), "mean": ("terms",), "sd": ("terms",),
                      "beta": ("coefficients",)}

    def __post_init__(self) -> None:
        k = np.shape(self.features)[0] if np.ndim(self.features) == 1 else -1
        if (k < 0 or np.shape(self.mean) != (k,) or np.shape(self.sd) != (k,)
                or np.shape(self.beta) != (k + 1,)):
            raise ModelError("a linear model needs k feature indices, k means, k SDs and "
                             "1 + k coefficients")
        if k and (np.min(self.features) < 0 or np.any(np.asarray(self.sd) <= 0)):
            raise ModelError("a linear model needs non-negative feature indices and SDs > 0")

    def score(self, x: npt.ArrayLike) -> FloatArray:
        z = (np.asarray(x, dtype=np.float64)[:, self.features] - self.mean) / self.sd
        scores: FloatArray = self.beta[0] + z @ self.beta[1:]
        return scores

    @property
    def selected(self) -> IndexArray:
        """Feature indices with a non-zero coefficient."""
        chosen: IndexArray = self.features[self.beta[1:] != 0]
        return chosen
