"""The error hierarchy.

Two kinds of failure exist at a site:

* a **configuration error** (a protocol, site config or manifest that cannot be used at all): the
  command stops before touching any case, naming the file, the field and the reason;
* a **case error** (one patient's files are missing, corrupt or inconsistent): the case is skipped
  with a :class:`SkipReason` in the ingestion report and every other case goes on.

Messages name the case, the file and the reason. Nothing in here ever goes into a message that
leaves the site except the short reason code.
"""

from __future__ import annotations

import enum


class SkipReason(str, enum.Enum):
    """Why a case was skipped. The value is the stable code written to reports."""

    DUPLICATE_CASE_ID = "duplicate_case_id"
    MISSING_FIELD = "missing_field"
    FILE_MISSING = "file_missing"
    IMAGE_UNREADABLE = "image_unreadable"
    MASK_UNREADABLE = "mask_unreadable"
    SERIES_NOT_FOUND = "series_not_found"
    ROI_NOT_FOUND = "roi_not_found"
    SUV_TAGS_MISSING = "suv_tags_missing"
    GEOMETRY_MISMATCH = "geometry_mismatch"
    EMPTY_MASK = "empty_mask"
    MASK_TOO_SMALL = "mask_too_small"
    LABEL_MISSING = "label_missing"
    LABEL_INVALID = "label_invalid"
    COVARIATE_INVALID = "covariate_invalid"
    STANDARDIZATION_FAILED = "standardization_failed"
    EXTRACTION_FAILED = "extraction_failed"
    RESOURCE_LIMIT = "resource_limit"
    NON_FINITE_VOXELS = "non_finite_voxels"
    PATH_OUTSIDE_DATA_ROOT = "path_outside_data_root"
    MASK_MISMATCH = "mask_mismatch"
    INTERNAL_ERROR = "internal_error"


#: The most voxels one case's image, or the grid it is resampled to, may hold unless a site
#: says otherwise (``max_case_voxels`` in its site config): 2^28, a 512 x 512 x 1024 CT, 1 GiB
#: as float32; a case's standardization holds a few such copies, which an 8 GB site can afford.
MAX_CASE_VOXELS = 2**28


class MyeloFedError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(MyeloFedError):
    """A protocol, site config, manifest or option that cannot be used.

    Parameters
    ----------
    source
        The file (or option) at fault.
    problems
        One line per problem, each naming the field and the reason.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: invalid\n{lines}")


class CaseError(MyeloFedError):
    """One case cannot be used; the site skips it and goes on.

    Parameters
    ----------
    reason
        The stable reason code.
    detail
        A human-readable explanation naming the file and what is wrong with it.
    """

    def __init__(self, reason: SkipReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}")


class HarmonizationError(MyeloFedError):
    """ComBat cannot be fitted or applied as asked: a batch below the minimum size, a covariate
    cell that would expose a patient through the sums a site sends, a singular design, an
    unknown batch or level. The message names the batch, column or level and the reason."""
