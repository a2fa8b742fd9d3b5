"""The built-in synthetic multi-site myeloma cohort (``myelofed simulate``).

:mod:`.cohort` draws sites, scanners and patients and :mod:`.images` renders their images (pure
functions of a seed); :mod:`.write` writes them as NIfTI and/or DICOM + SEG with the site
manifests.
"""

from common.synthetic.cohort import (
    Patient,
    Pattern,
    ScannerEffects,
    SiteSpec,
    Task,
    default_sites,
    make_cohort,
    make_patients,
    make_sites,
)
from common.synthetic.images import MUSCLE_LABEL, ROI_LABEL, render
from common.synthetic.write import CohortSpec, preview_png, read_cohort_spec, write_cohort

__all__ = [
    "MUSCLE_LABEL", "ROI_LABEL", "CohortSpec", "Patient", "Pattern", "ScannerEffects", "SiteSpec",
    "Task", "default_sites", "make_cohort", "make_patients", "make_sites", "preview_png",
    "read_cohort_spec", "render", "write_cohort",
]
