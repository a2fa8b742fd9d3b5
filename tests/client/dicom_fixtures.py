"""The shared sarcoma DICOM data of the client.dicom tests (``test_dicom_series``,
``test_dicom_masks``): where it lies, skipping when it is absent, the series and RTSTRUCT masks
read once per session, and a geometry comparison."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from client.dicom.masks import rtstruct_to_mask
from client.dicom.series import read_dicom_series

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
STS = DATA / "sts"
PATIENTS = ("STS_002", "STS_008", "STS_012", "STS_019")
MODALITIES = ("CT", "MR_T1", "PET")
CASES = [(p, m) for p in PATIENTS for m in MODALITIES]

#: The sarcoma files trip pydicom's value-length checks (e.g. an 18-character SH): harmless here.
#: A test module reading them sets ``pytestmark = SARCOMA_WARNINGS``.
SARCOMA_WARNINGS = pytest.mark.filterwarnings("ignore:The value length:UserWarning")


def sts(*parts: str) -> Path:
    """A path under ../shared/data/sts, or skip with a clear message when it is absent."""
    path = STS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared sarcoma test data not found at {path} (put shared/ beside the repo)")
    return path


def roi_name(modality: str) -> str:
    # The RTSTRUCTs name their single ROI per modality: GTV_Mass_CT, GTV_Mass_MR_T1, GTV_Mass_PET.
    return f"GTV_Mass_{modality}"


@functools.cache
def _series(patient: str, modality: str) -> tuple[sitk.Image, pydicom.Dataset]:
    return read_dicom_series(STS / "dicom" / patient / modality / "image")


def series(patient: str, modality: str) -> tuple[sitk.Image, pydicom.Dataset]:
    sts("dicom", patient, modality, "image")
    return _series(patient, modality)


@functools.cache
def _rtstruct_mask(patient: str, modality: str) -> sitk.Image:
    image, _ = _series(patient, modality)
    return rtstruct_to_mask(
        STS / "dicom" / patient / modality / "mask" / "RS.dcm", image, roi_name(modality)
    )


def rtstruct_mask(patient: str, modality: str) -> sitk.Image:
    sts("dicom", patient, modality, "mask", "RS.dcm")
    series(patient, modality)
    return _rtstruct_mask(patient, modality)


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Same size; spacing, origin, direction equal to well under a voxel (NIfTI keeps float32)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5, atol=1e-5)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    )
