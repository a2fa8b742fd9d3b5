"""The built-in synthetic multi-site myeloma cohort (``myelofed simulate``).

:mod:`.phantom` draws patients and renders their images (pure functions of a seed);
:mod:`.write` writes them as NIfTI and/or DICOM + SEG with the site manifests.
"""

from common.synthetic.phantom import (
    MUSCLE_LABEL,
    ROI_LABEL,
    Patient,
    Pattern,
    ScannerEffects,
    SiteSpec,
    Task,
    default_sites,
    make_cohort,
    make_patients,
    make_sites,
    render,
)
from common.synthetic.write import CohortSpec, preview_png, read_cohort_spec, write_cohort

__all__ = [
    "MUSCLE_LABEL", "ROI_LABEL", "CohortSpec", "Patient", "Pattern", "ScannerEffects", "SiteSpec",
    "Task", "default_sites", "make_cohort", "make_patients", "make_sites", "preview_png",
    "read_cohort_spec", "render", "write_cohort",
]
