"""A site's own configuration: where its data is and how much of the machine it may use.

Unlike the study protocol this never leaves the site and is not hashed: two hospitals with the
same protocol and different paths compute the same features.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import MAX_CASE_VOXELS, ConfigError
from common.payloads import MIN_ROWS_SENT
from common.protocol import read_mapping, validation_problems


@dataclass(frozen=True)
class Budget:
    """A site's limits on one case's grids: voxels, and the memory they take to process (MB;
    None: no memory limit). Checked in :mod:`client.limits`."""
    max_voxels: int = MAX_CASE_VOXELS
    max_memory_mb: int | None = None


class SiteConfig(BaseModel):
    """Paths and resources of one hospital site, and the study apps it approved.

    Relative paths are resolved against the folder of the config file.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    site_name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    manifest: Path
    work_dir: Path = Path("myelofed-work")
    data_root: Path | None = Field(
        None, description="The folder every image and mask of the manifest must resolve inside "
        "(symbolic links followed); a case pointing elsewhere is skipped "
        "(path_outside_data_root). Unset: any path this user can read.")
    workers: int | None = Field(None, ge=1, le=256,
                                description="Parallel cases; default: all cores.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    min_patients: int = Field(
        MIN_ROWS_SENT, ge=1, le=1000,
        description="The fewest patients that any sum this site sends, or any combination of its "
        "sums, may cover (the release ledger); a study can ask for more (ComBat's min_cell), "
        "never for fewer.")
    max_case_voxels: int = Field(
        MAX_CASE_VOXELS, ge=1_000_000, le=2 ** 34,
        description="The most voxels a case's image, or its resampled grid, may hold: a larger "
        "case is skipped (resource_limit) before it is read into memory.")
    max_case_memory_mb: int | None = Field(
        3072, ge=256, le=2 ** 20,
        description="The most memory one case may take (MB): a case whose grids are estimated "
        "to need more is skipped (resource_limit) before it is read, and with several workers "
        "each case's process is capped there (Linux). The default fits two workers on an 8 GB "
        "machine; none when unset.")
    case_time_limit_s: float | None = Field(
        1800.0, gt=0, le=7 * 24 * 3600, allow_inf_nan=False,
        description="The longest one case's standardization and extraction may take: a case "
        "past it is skipped (resource_limit). Checked between Python steps; with several "
        "workers a case still running 30 s (or a tenth of the limit) later is killed, even in "
        "a long ITK call. None when unset.")
    approved_apps: tuple[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")], ...] = Field(
        (), description="SHA-256 of each study app bundle this site runs ('myelofed app-hash');"
        " its SuperNode refuses any other.")

    @property
    def budget(self) -> Budget:
        return Budget(self.max_case_voxels, self.max_case_memory_mb)

    @property
    def n_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    @property
    def cache_dir(self) -> Path:
        return self.work_dir / "cache"


def load_site_config(path: Path | str) -> SiteConfig:
    """Load a site config (TOML/YAML); relative paths are taken from the file's folder."""
    path = Path(path)
    data = read_mapping(path)
    base = path.resolve().parent
    data.setdefault("work_dir", "myelofed-work")
    for key in ("manifest", "work_dir", "data_root"):
        if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
            data[key] = str(base / data[key])
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(str(path), validation_problems(exc)) from None
