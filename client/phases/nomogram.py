"""The nomogram's design at a site: the radiomics score of each training set's model (a logit)
and the protocol's clinical columns. Its terms go back in the radiomics phase's rounds
(:func:`client.phases.radiomics.model_terms`); its scores in the validation
(:func:`client.phases.validation.evaluate_models`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.payloads import clinical_columns
from common.protocol import StudyProtocol
from common.selection.model import LinearModel


def nomogram_design(table: pd.DataFrame, protocol: StudyProtocol, x: np.ndarray,
                    radiomics: list[LinearModel]) -> np.ndarray:
    """One block of columns per radiomics model: its score (a logit) and the clinical
    columns."""
    clinical = [table[column].to_numpy(float) if level is None
                else (table[column].astype(str) == str(level)).to_numpy(float)
                for column, level in clinical_columns(protocol)]
    return np.hstack([np.column_stack([model.score(x), *clinical]) for model in radiomics])
