"""Variants of a written cohort that share its images: the same sites and files, seen through
other manifests (e.g. a site whose hospital drew no masks, for the segmentation network)."""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Collection
from pathlib import Path

from common.provenance import atomic_write_bytes


def without_masks(cohort: Path, target: Path, sites: Collection[str]) -> Path:
    """A copy of ``cohort``'s study protocol and site manifests under ``target`` (its image and
    mask paths made absolute, so the files stay where they are) in which every case of
    ``sites`` has no mask (``auto``: the study's segmentation network makes it). Returns
    ``target``. A site not in the cohort is a :class:`ValueError`."""
    folders = {p.parent.name: p for p in sorted(cohort.glob("*/manifest.csv"))}
    unknown = sorted(set(sites) - set(folders))
    if unknown:
        raise ValueError(f"{cohort} has no site {unknown} (sites: {sorted(folders)})")
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(cohort / "study.yaml", target / "study.yaml")
    for site, manifest in folders.items():
        with manifest.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            columns, rows = list(reader.fieldnames or []), list(reader)
        for row in rows:
            for column in ("image", "mask"):
                if row.get(column):
                    row[column] = str((manifest.parent / row[column]).resolve())
            if site in sites:
                row["mask"] = "auto"
        (target / site).mkdir(exist_ok=True)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(target / site / "manifest.csv", text.getvalue().encode("utf-8"))
    return target
