"""The site manifest: one CSV row per case.

Required columns: ``case_id``, ``image``, ``mask`` and the protocol's label column (and for a
survival task its event column: the label is then the follow-up time in months). Optional:
``roi`` (RTSTRUCT ROI name or SEG segment for this case), ``series_uid`` (which DICOM series
when a folder holds several), ``mask_source`` (``auto`` for a mask a segmentation network
made, as ``myelofed site segment`` writes it: the features table marks the case), the
protocol's covariates and batch (scanner) column.
``image`` is a DICOM series folder or a NIfTI/NRRD/MHA file; ``mask`` is a NIfTI/NRRD/MHA label
map, an RTSTRUCT or DICOM SEG file, or a folder holding one. Relative paths are taken from the
manifest's folder. A case without a mask has ``mask`` empty or ``auto``: ``myelofed site segment``
makes one with the study's segmentation network (and writes a manifest that names it); read
``for_segmentation``, such a row is a case to segment, its label and covariates unread.

A manifest that cannot be read at all raises :class:`ConfigError`; a bad row becomes a
:class:`RowProblem` and the other rows go on.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.errors import ConfigError, SkipReason
from common.protocol import StudyProtocol, TaskKind

REQUIRED_COLUMNS = ("case_id", "image", "mask")


@dataclass(frozen=True)
class CaseSpec:
    """One usable manifest row, with its label and covariates already typed (``event``: a
    survival task's 1 or 0, None for the other tasks). ``mask`` is None only for a case to
    segment (read ``for_segmentation``, whose label is then NaN, or ``auto_masks="pending"``);
    ``auto_mask`` says the mask is one the segmentation network made."""

    case_id: str
    row: int
    image: Path
    mask: Path | None
    label: float
    batch: str
    roi: str | None = None
    series_uid: str | None = None
    covariates: dict[str, str | float] = field(default_factory=dict)
    event: float | None = None
    auto_mask: bool = False


@dataclass(frozen=True)
class RowProblem:
    """A manifest row that cannot be used."""

    case_id: str
    row: int
    reason: SkipReason
    detail: str


def _parse_label(text: str, protocol: StudyProtocol) -> float:
    """The label as a number (0/1 for classification), or ValueError with the reason."""
    task = protocol.task
    if task.kind is TaskKind.CLASSIFICATION:
        if task.classes is not None:
            if text not in task.classes:
                raise ValueError(f"'{text}' is not one of {list(task.classes)}")
            return float(task.classes.index(text))
        return _binary(text)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"'{text}' is not a finite number")
    if task.kind is TaskKind.SURVIVAL and value < 0:
        raise ValueError(f"{value:g} is a negative follow-up time")
    if task.value_range is not None and not task.value_range[0] <= value <= task.value_range[1]:
        raise ValueError(f"{value:g} is outside {list(task.value_range)}")
    return value


def _binary(text: str, zero: str = "0", one: str = "1") -> float:
    """0.0 or 1.0 from a 0/1 field (``zero`` and ``one`` say what each means in the error), or
    ValueError."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value not in (0.0, 1.0):
        raise ValueError(f"'{text}' is not {zero} or {one}")
    return value


#: Where the csv module puts a row's fields beyond the header's.
_EXTRA = "\x00extra"


#: What a manifest's ``mask`` says for a case without a mask (besides leaving it empty).
AUTO_MASK = "auto"


def read_manifest(
    path: Path, protocol: StudyProtocol, default_batch: str, data_root: Path | None = None,
    for_segmentation: bool = False,
    auto_masks: Mapping[str, Path | str] | Literal["pending"] | None = None,
) -> tuple[list[CaseSpec], list[RowProblem]]:
    """Read and validate a manifest.

    Parameters
    ----------
    path
        The CSV file.
    protocol
        Gives the label, covariate and batch columns.
    default_batch
        Batch of every case when the protocol's batch column is absent (usually the site name).
    data_root
        When given, every image and mask must resolve inside this folder (symbolic links
        followed): a row pointing elsewhere is a ``path_outside_data_root`` problem.
    for_segmentation
        Read for ``myelofed site segment``: a row whose mask is empty or ``auto`` is a case to
        segment (``mask`` None), and labels and covariates are not read (NaN, none).
    auto_masks
        A study with a segmentation network: for a row without a mask, the mask the network
        made (a path; the case is marked ``auto_mask``) or why it made none (a text: the row
        is a ``missing_field`` problem naming it). ``"pending"``: the network has not run
        yet, and such a row is a case whose ``mask`` is None (labels read, for the counts).

    Returns
    -------
    cases, problems
        The usable rows in file order, and one problem per unusable row.
    """
    if not path.is_file():
        raise ConfigError(str(path), ["manifest file not found"])
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, restkey=_EXTRA)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{k.strip(): v if k == _EXTRA else (v or "").strip() for k, v in r.items()}
                    for r in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(str(path), [f"not a readable CSV file: {exc}"]) from None
    twice = sorted(c for c, n in Counter(header).items() if n > 1)
    if twice:
        raise ConfigError(str(path), [f"column '{c}' appears more than once in the header"
                                      for c in twice])
    label_col, event_col = protocol.task.label_column, protocol.task.event_column
    missing = [c for c in (*REQUIRED_COLUMNS, label_col, *([event_col] if event_col else []))
               if c not in header]
    missing += [c for c in protocol.covariates.columns if c not in header]
    if missing:
        hint = ([f"the header is one column holding '{sep}': a manifest is comma-separated"
                 for sep in (";", "\t") if len(header) == 1 and sep in header[0]])
        raise ConfigError(
            str(path), [*hint, *(f"missing column '{c}' (columns found: {header})"
                                 for c in missing)]
        )
    has_batch = protocol.batch_column is not None and protocol.batch_column in header

    base = path.resolve().parent
    root = data_root.resolve() if data_root is not None else None
    counts = Counter(r["case_id"] for r in rows if r.get("case_id"))
    cases: list[CaseSpec] = []
    problems: list[RowProblem] = []
    for row_number, row in enumerate(rows, start=2):  # row 1 is the header
        case_id = row.get("case_id", "")

        def problem(reason: SkipReason, detail: str, case_id: str = case_id,
                    row_number: int = row_number) -> None:  # this row's, bound here
            problems.append(RowProblem(case_id or f"<row {row_number}>", row_number, reason,
                                       detail))

        if not case_id:
            problem(SkipReason.MISSING_FIELD, f"row {row_number}: empty case_id")
            continue
        if counts[case_id] > 1:
            problem(
                SkipReason.DUPLICATE_CASE_ID,
                f"case_id '{case_id}' appears {counts[case_id]} times; every copy is skipped",
            )
            continue
        if _EXTRA in row:
            problem(SkipReason.MISSING_FIELD, f"row {row_number} has {len(row[_EXTRA])} more "
                    "field(s) than the header (an unquoted comma?)")
            continue
        no_mask = row.get("mask", "") in ("", AUTO_MASK)
        if not row.get("image"):
            problem(SkipReason.MISSING_FIELD, "empty image")
            continue
        made = (auto_masks.get(case_id) if no_mask and isinstance(auto_masks, Mapping)
                else None)
        if isinstance(made, str):
            problem(SkipReason.MISSING_FIELD, f"no mask, and the study's segmentation network "
                    f"made no usable one: {made}")
            continue
        if no_mask and made is None and not for_segmentation and auto_masks != "pending":
            problem(SkipReason.MISSING_FIELD,
                    f"no mask ({'empty' if not row.get('mask') else AUTO_MASK!r}): make one "
                    "with 'myelofed site segment', whose manifest names it"
                    + (", or add a segmentation section to the study protocol"
                       if auto_masks is None else ""))
            continue
        paths = ("image",) if no_mask else ("image", "mask")
        unusable = [c for c in paths if "\x00" in row[c]]
        if unusable:
            problem(SkipReason.FILE_MISSING, f"{', '.join(unusable)}: the path holds a NUL byte")
            continue
        if for_segmentation:
            image = (base / row["image"]).resolve()
            mask = None if no_mask else (base / row["mask"]).resolve()
            outside = [f"{c} '{row[c]}' resolves to {p}" for c, p in (("image", image),
                                                                    ("mask", mask))
                       if p is not None and root is not None and not p.is_relative_to(root)]
            if outside:
                problem(SkipReason.PATH_OUTSIDE_DATA_ROOT,
                        f"{'; '.join(outside)}, outside the site's data_root {root}")
                continue
            batch = (row.get(protocol.batch_column or "", "") if has_batch else "") or default_batch
            cases.append(CaseSpec(case_id, row_number, image, mask, float("nan"), batch,
                                  roi=row.get("roi") or None,
                                  series_uid=row.get("series_uid") or None))
            continue
        if not row.get(label_col):
            problem(SkipReason.LABEL_MISSING, f"no value in label column '{label_col}'")
            continue
        try:
            label = _parse_label(row[label_col], protocol)
        except ValueError as exc:
            problem(SkipReason.LABEL_INVALID, f"label column '{label_col}': {exc}")
            continue
        event = None
        if event_col:
            if not row.get(event_col):
                problem(SkipReason.LABEL_MISSING, f"no value in event column '{event_col}'")
                continue
            try:
                event = _binary(row[event_col], "0 (censored)", "1 (the event)")
            except ValueError as exc:
                problem(SkipReason.LABEL_INVALID, f"event column '{event_col}': {exc}")
                continue
        covariates: dict[str, str | float] = {}
        bad = []
        for column, levels in protocol.covariates.categorical.items():
            value = row.get(column, "")
            if value not in levels:
                bad.append(f"'{column}' = '{value}' is not one of {list(levels)}")
            covariates[column] = value
        for column in protocol.covariates.continuous:
            try:
                number = float(row.get(column, ""))
                if not math.isfinite(number):
                    raise ValueError
                covariates[column] = number
            except ValueError:
                bad.append(f"'{column}' = '{row.get(column, '')}' is not a number")
        if bad:
            problem(SkipReason.COVARIATE_INVALID, "; ".join(bad))
            continue
        batch = default_batch
        if has_batch:
            batch = row.get(protocol.batch_column or "", "")
            if not batch:
                problem(SkipReason.MISSING_FIELD, f"empty batch column '{protocol.batch_column}'")
                continue
        image = (base / row["image"]).resolve()
        mask = made if isinstance(made, Path) else (
            None if no_mask else (base / row["mask"]).resolve())
        # (a mask the network made lies in the site's work folder, not under its data root)
        checked = (("image", image),) if isinstance(made, Path) else (("image", image),
                                                                      ("mask", mask))
        outside = [f"{c} '{row[c]}' resolves to {p}" for c, p in checked
                   if p is not None and root is not None and not p.is_relative_to(root)]
        if outside:
            problem(SkipReason.PATH_OUTSIDE_DATA_ROOT,
                    f"{'; '.join(outside)}, outside the site's data_root {root}")
            continue
        cases.append(
            CaseSpec(
                case_id=case_id,
                row=row_number,
                image=image,
                mask=mask,
                label=label,
                batch=batch,
                roi=row.get("roi") or None,
                series_uid=row.get("series_uid") or None,
                covariates=covariates,
                event=event,
                auto_mask=isinstance(made, Path) or row.get("mask_source") == "auto",
            )
        )
    return cases, problems
