"""Provenance: software versions and atomic file writes, carried with every result."""

from __future__ import annotations

import io
import json
import os
import platform
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

_PACKAGES = (
    "myelofed", "pyradiomics-bhklab", "SimpleITK", "numpy", "pydicom", "highdicom",
    "scikit-image", "pandas", "pyarrow", "pydantic",
)
#: What the reports name besides: the federation, the models and the CNN.
REPORT_PACKAGES = ("flwr", "scikit-learn", "monai", "torch")


def software_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of Python and of the packages that decide the features (read from metadata,
    without importing them), and of ``extra`` packages."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES + extra:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a killed run) sees the old file or the
    new one, never half of one: write a temporary file in the same folder, then rename."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, json.dumps(payload, indent=2, sort_keys=False).encode("utf-8"))


def atomic_write_npz(path: Path, arrays: Mapping[str, Any], compressed: bool = False) -> None:
    """Numpy arrays by name as one NPZ (zip-compressed when ``compressed``), written
    atomically."""
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_parquet(path: Path, frame: Any) -> None:
    """A pandas DataFrame as Parquet (no index), written atomically."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())
