"""The same patients through the DICOM + RTSTRUCT path and the NIfTI path give the same
features (real CT, T1 MR and PET from the shared sarcoma set)."""

from __future__ import annotations

import numpy as np
import pytest

from client.manifest import CaseSpec
from client.pipeline import CaseProcessor
from common.protocol import protocol_from_mapping
from tests.conftest import shared_data

PATIENTS = ("STS_002", "STS_008", "STS_012", "STS_019")
# The published NIfTI PET is already SUV, so the DICOM path must convert; MR and CT are as-is.
PROTOCOLS = {
    "CT": {"modality": "CT", "standardization": {
        "resegmentation_range": [-1000.0, 400.0],
        "resample": {"spacing_mm": [2.0, 2.0, 2.0]}}, "radiomics": {"bin_width": 25.0}},
    "MR_T1": {"modality": "MR", "standardization": {
        "resample": {"spacing_mm": [2.0, 2.0, 2.0]}}, "radiomics": {"bin_width": 25.0}},
    "PET": {"modality": "PET", "standardization": {
        "suv": True, "resegmentation_range": [0.0, float("inf")],
        "resample": {"spacing_mm": [4.0, 4.0, 4.0]}}, "radiomics": {"bin_width": 0.25}},
}


@pytest.mark.parametrize("modality", sorted(PROTOCOLS))
def test_dicom_and_nifti_paths_agree(modality):
    base = {"name": f"agree-{modality}", "task": {"kind": "classification"},
            "batch_column": None, "ingestion": {"rtstruct_roi": f"GTV_Mass_{modality}"}}
    protocol = protocol_from_mapping({**base, **PROTOCOLS[modality]})
    processor = CaseProcessor(protocol, "extract", cache_dir=None)
    compared = 0
    for patient in PATIENTS:
        nifti = shared_data("sts", "nifti", patient)
        dicom = shared_data("sts", "dicom", patient, modality)
        if not (nifti / f"{modality}_image.nii.gz").is_file():
            continue  # the shared copy lacks some CT NIfTI images (size limit)
        from_nifti = processor(CaseSpec(patient, 2, nifti / f"{modality}_image.nii.gz",
                                        nifti / f"{modality}_mask.nii.gz", 0.0, "b"))
        from_dicom = processor(CaseSpec(patient, 2, dicom / "image", dicom / "mask" / "RS.dcm",
                                        0.0, "b"))
        assert from_nifti.ok, from_nifti.detail
        assert from_dicom.ok, from_dicom.detail
        a, b = from_nifti.features, from_dicom.features
        assert a.keys() == b.keys()
        names = sorted(a)
        va = np.array([a[n] for n in names])
        vb = np.array([b[n] for n in names])
        # Same voxels, same mask: the two paths differ only by float rounding in the reader.
        np.testing.assert_allclose(vb, va, rtol=1e-5, atol=1e-9)
        compared += 1
    if compared == 0:
        pytest.skip(f"no {modality} NIfTI image in the shared copy")
