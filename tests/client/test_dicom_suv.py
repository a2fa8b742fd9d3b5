"""client.dicom.suv: the SUV body-weight factor on made-up PET headers."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from client.dicom.suv import suv_factor_body_weight
from common.errors import CaseError, SkipReason


def _pet_header(**changes: object) -> Dataset:
    """80 kg, 370 MBq of F-18 injected at 10:15, series start at 11:15 (one hour later)."""
    ds = Dataset()
    ds.Modality = "PT"
    ds.Units = "BQML"
    ds.DecayCorrection = "START"
    ds.PatientWeight = "80"
    ds.SeriesTime = "111500.000000"
    ds.AcquisitionTime = "111500.000000"
    info = Dataset()
    info.RadionuclideTotalDose = "370000000"
    info.RadionuclideHalfLife = "6586.2"
    info.RadiopharmaceuticalStartTime = "101500.000000"
    ds.RadiopharmaceuticalInformationSequence = [info]
    for key, value in changes.items():
        target = info if key in ("RadionuclideTotalDose", "RadionuclideHalfLife",
                                 "RadiopharmaceuticalStartTime",
                                 "RadiopharmaceuticalStartDateTime") else ds
        if value is None:
            if key in target:
                delattr(target, key)
        elif isinstance(value, bytes):  # a raw, unparsed value, as read from a file
            tag = pydicom.datadict.tag_for_keyword(key)
            target[tag] = RawDataElement(Tag(tag), None, len(value), value, 0, True, True)
        else:
            setattr(target, key, value)
    return ds


# By hand: dose at 11:15 = 370e6 * 2 ** (-3600 / 6586.2) = 253 314 180.24 Bq;
# factor = 80 000 g / 253 314 180.24 Bq = 3.158133505e-4 g/Bq.
ONE_HOUR_FACTOR = 3.158133505344494e-4


def test_suv_factor_decays_the_dose_to_the_series_start() -> None:
    assert suv_factor_body_weight(_pet_header()) == pytest.approx(ONE_HOUR_FACTOR, rel=1e-9)


def test_suv_factor_falls_back_to_acquisition_time_and_start_datetime() -> None:
    header = _pet_header(SeriesTime=None, RadiopharmaceuticalStartTime=None,
                         RadiopharmaceuticalStartDateTime="20240101101500.00+0100")
    assert suv_factor_body_weight(header) == pytest.approx(ONE_HOUR_FACTOR, rel=1e-9)


def test_suv_factor_without_decay_for_admin() -> None:
    header = _pet_header(DecayCorrection="ADMIN")
    assert suv_factor_body_weight(header) == pytest.approx(80_000 / 370e6, rel=1e-12)


def test_suv_factor_is_one_for_gml() -> None:
    assert suv_factor_body_weight(_pet_header(Units="GML", PatientWeight=None)) == 1.0


def test_suv_factor_crosses_midnight() -> None:
    # Injection 23:30, series 00:30 the next day: one hour of decay, not minus 23 hours.
    header = _pet_header(RadiopharmaceuticalStartTime="233000", SeriesTime="003000.000000")
    assert suv_factor_body_weight(header) == pytest.approx(ONE_HOUR_FACTOR, rel=1e-9)


@pytest.mark.parametrize(
    ("change", "tag"),
    [
        ({"PatientWeight": None}, "PatientWeight"),
        ({"PatientWeight": "0"}, "PatientWeight"),
        ({"PatientWeight": b"heavy "}, "PatientWeight"),
        ({"RadionuclideTotalDose": None}, "RadionuclideTotalDose"),
        ({"RadionuclideHalfLife": b"abc "}, "RadionuclideHalfLife"),
        ({"RadiopharmaceuticalStartTime": None}, "RadiopharmaceuticalStartTime"),
        ({"SeriesTime": None, "AcquisitionTime": None}, "SeriesTime"),
        ({"DecayCorrection": None}, "DecayCorrection"),
        ({"Units": "CNTS"}, "Units"),
        ({"RadiopharmaceuticalInformationSequence": []}, "RadiopharmaceuticalInformationSequence"),
    ],
)
def test_suv_factor_names_the_missing_tag(change: dict, tag: str) -> None:
    with pytest.raises(CaseError) as err:
        suv_factor_body_weight(_pet_header(**change))
    assert err.value.reason is SkipReason.SUV_TAGS_MISSING
    assert tag in err.value.detail
