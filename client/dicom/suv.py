"""PET SUV body weight: the factor from a PET header, and the DICOM time parsing it needs."""

from __future__ import annotations

import math
import re

import pydicom

from client.dicom.files import short_reason
from common.errors import CaseError, SkipReason

__all__ = ["suv_factor_body_weight"]

_TM_RE = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")


def _seconds_of_day(value: object) -> float | None:
    """Seconds since midnight of a DICOM TM ("HHMMSS.FFFFFF", "HHMM", "HH:MM:SS"), or None."""
    text = str(value).strip().replace(":", "")
    match = _TM_RE.match(text)
    if not match:
        return None
    hours = int(match.group(1))
    minutes = int(match.group(2) or 0)
    seconds = int(match.group(3) or 0)
    fraction = float(match.group(4)) if match.group(4) else 0.0
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    return hours * 3600.0 + minutes * 60.0 + seconds + fraction


def _seconds_of_day_from_dt(value: object) -> float | None:
    """Seconds since midnight of the time part of a DICOM DT ("YYYYMMDDHHMMSS.FFFFFF&ZZXX")."""
    text = re.split(r"[+-]", str(value).strip(), maxsplit=1)[0]
    if len(text) < 10 or not text[:8].isdigit():
        return None
    return _seconds_of_day(text[8:])


def _positive_float(ds: pydicom.Dataset, keyword: str, where: str) -> float:
    if keyword not in ds:
        raise CaseError(SkipReason.SUV_TAGS_MISSING, f"PET header: {where}{keyword} is missing")
    try:
        raw = ds[keyword].value  # converting a raw element may itself fail (e.g. DS "abc")
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise CaseError(
                SkipReason.SUV_TAGS_MISSING, f"PET header: {where}{keyword} is missing"
            )
        value = float(raw)
    except (TypeError, ValueError) as exc:
        raise CaseError(
            SkipReason.SUV_TAGS_MISSING,
            f"PET header: {where}{keyword} is not a number ({short_reason(exc)})",
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise CaseError(
            SkipReason.SUV_TAGS_MISSING,
            f"PET header: {where}{keyword} = {value!r} is not a positive number",
        )
    return value


def suv_factor_body_weight(header: pydicom.Dataset) -> float:
    """Factor turning PET activity concentration (Bq/mL) into SUV body weight.

    ``SUVbw = activity * weight_g / dose_at_reference``, where the injected dose is decay
    corrected to the time the image values refer to: the series start for ``DecayCorrection``
    ``START`` (SeriesTime, else AcquisitionTime), the injection itself for ``ADMIN``.
    Times of day are used (dates in anonymised data are often shifted independently); a scan time
    earlier than the injection time is taken to be on the next day (midnight crossing).

    Parameters
    ----------
    header
        The header of a slice of the PET series.

    Returns
    -------
    float
        The multiplicative factor (g/Bq, giving g/mL); 1.0 when ``Units`` is already ``GML``.

    Raises
    ------
    CaseError
        ``SUV_TAGS_MISSING`` naming the tag that is missing or invalid: Units (must be BQML or
        GML), PatientWeight, RadiopharmaceuticalInformationSequence, RadionuclideTotalDose,
        RadionuclideHalfLife, RadiopharmaceuticalStartTime/DateTime, DecayCorrection, SeriesTime.
    """
    units = str(header.get("Units", "")).strip().upper()
    if units == "GML":
        return 1.0
    if not units:
        raise CaseError(SkipReason.SUV_TAGS_MISSING, "PET header: Units is missing")
    if units != "BQML":
        raise CaseError(
            SkipReason.SUV_TAGS_MISSING,
            f"PET header: Units = {units!r}; only BQML (or GML, already SUV) can be converted",
        )
    weight_kg = _positive_float(header, "PatientWeight", "")
    sequence = header.get("RadiopharmaceuticalInformationSequence")
    if not sequence:
        raise CaseError(
            SkipReason.SUV_TAGS_MISSING,
            "PET header: RadiopharmaceuticalInformationSequence is missing or empty",
        )
    item = sequence[0]
    where = "RadiopharmaceuticalInformationSequence[0]."
    dose = _positive_float(item, "RadionuclideTotalDose", where)
    decay = str(header.get("DecayCorrection", "")).strip().upper()
    if decay == "ADMIN":
        return weight_kg * 1000.0 / dose
    if not decay:
        raise CaseError(SkipReason.SUV_TAGS_MISSING, "PET header: DecayCorrection is missing")
    if decay != "START":
        raise CaseError(
            SkipReason.SUV_TAGS_MISSING,
            f"PET header: DecayCorrection = {decay!r}; only START or ADMIN are supported",
        )
    half_life = _positive_float(item, "RadionuclideHalfLife", where)
    injection = None
    if item.get("RadiopharmaceuticalStartTime"):
        injection = _seconds_of_day(item.RadiopharmaceuticalStartTime)
    if injection is None and item.get("RadiopharmaceuticalStartDateTime"):
        injection = _seconds_of_day_from_dt(item.RadiopharmaceuticalStartDateTime)
    if injection is None:
        raise CaseError(
            SkipReason.SUV_TAGS_MISSING,
            f"PET header: {where}RadiopharmaceuticalStartTime (or ...StartDateTime) is missing "
            "or invalid",
        )
    scan = None
    for keyword in ("SeriesTime", "AcquisitionTime"):
        if header.get(keyword):
            scan = _seconds_of_day(header[keyword].value)
            if scan is not None:
                break
    if scan is None:
        raise CaseError(
            SkipReason.SUV_TAGS_MISSING,
            "PET header: SeriesTime (or AcquisitionTime) is missing or invalid",
        )
    elapsed = scan - injection
    if elapsed < 0:
        elapsed += 24 * 3600.0  # scan after midnight, injection before
    decayed_dose = dose * math.exp(-math.log(2.0) * elapsed / half_life)
    return weight_kg * 1000.0 / decayed_dose
