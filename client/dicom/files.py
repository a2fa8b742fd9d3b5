"""Telling DICOM files apart, and what the DICOM readers share.

:func:`is_dicom_file` and :func:`dicom_modality` let a caller tell a DICOM object from an image
file, and an RTSTRUCT from a SEG, before it picks a reader. :func:`short_reason` and the SOP
class UIDs are shared by :mod:`client.dicom.series`, :mod:`client.dicom.suv` and
:mod:`client.dicom.masks`.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

__all__ = [
    "RTSTRUCT_SOP_CLASS",
    "SEG_SOP_CLASS",
    "dicom_modality",
    "is_dicom_file",
    "short_reason",
]

#: SOP Class UID of RT Structure Set Storage (an RTSTRUCT).
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"

#: SOP Class UID of Segmentation Storage (a DICOM SEG).
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def is_dicom_file(path: Path) -> bool:
    """Tell whether a file carries the DICOM Part 10 preamble (``DICM`` at byte 128).

    Parameters
    ----------
    path
        Any path.

    Returns
    -------
    bool
        True when ``path`` is a readable file whose bytes 128-131 are ``b"DICM"``. Cheap: reads
        132 bytes at most. Raw DICOM files without the preamble are not recognised.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_modality(path: Path) -> str | None:
    """The Modality (0008,0060) of one DICOM file.

    Parameters
    ----------
    path
        A DICOM file.

    Returns
    -------
    str or None
        E.g. ``"CT"``, ``"PT"``, ``"RTSTRUCT"``, ``"SEG"``; None when the file cannot be read as
        DICOM or has no Modality.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except Exception:  # noqa: BLE001 - any failure to parse means "not a readable DICOM file"
        return None
    value = ds.get("Modality")
    return str(value).strip() or None if value is not None else None



def short_reason(exc: BaseException) -> str:
    """One line saying why ``exc`` was raised, for a :class:`~common.errors.CaseError` detail:
    the last line of its message, or its type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
