"""The resource limits a site holds every case to, checked before anything sized by the input is
allocated: an image's voxels (from its header), the grid it is resampled to, the memory those
grids take to process, and the grey levels of its discretization; and, while a case runs, its
time (:func:`time_limit`) and, in a case's own process, its memory (:func:`cap_memory`)."""

from __future__ import annotations

import resource
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from common.errors import MAX_CASE_VOXELS, CaseError, SkipReason
from common.protocol import MAX_BINS
from common.site_config import Budget

__all__ = ["BYTES_PER_VOXEL", "ESTIMATE_BASE_MB", "MAX_BINS", "MAX_CASE_VOXELS", "Budget",
           "CaseTimeout", "cap_memory", "check_bins", "check_voxels", "time_limit"]

#: One case's peak memory: ``ESTIMATE_BASE_MB`` plus ``BYTES_PER_VOXEL`` per voxel of its
#: largest grid (the image as read or resampled). Measured by ``bench/case_memory.py`` on the CT,
#: MR and PET presets: 41 to 46 bytes per voxel at 8 million voxels, and up to 95 at 1 million
#: (PET's texture matrices, about 50 MB whatever the grid). A large ROI with many grey levels
#: can need more than this foresees: the cap on the case's process (:func:`cap_memory`) holds
#: that.
BYTES_PER_VOXEL = 48
ESTIMATE_BASE_MB = 64


def check_voxels(size: Sequence[int], what: str,
                 max_voxels: int | Budget = MAX_CASE_VOXELS) -> None:
    """Refuse a grid of more voxels than the budget allows, or whose processing is estimated to
    take more memory (:data:`BYTES_PER_VOXEL`), before it is allocated (``resource_limit``)."""
    budget = max_voxels if isinstance(max_voxels, Budget) else Budget(max_voxels)
    voxels = 1
    for n in size:
        voxels *= int(n)
    grid = f"{what} has {' x '.join(str(int(n)) for n in size)} = {voxels:,} voxels"
    if voxels > budget.max_voxels:
        raise CaseError(SkipReason.RESOURCE_LIMIT,
                        f"{grid}, more than this site's max_case_voxels ({budget.max_voxels:,})")
    estimate_mb = ESTIMATE_BASE_MB + voxels * BYTES_PER_VOXEL / 2 ** 20
    if budget.max_memory_mb is not None and estimate_mb > budget.max_memory_mb:
        raise CaseError(SkipReason.RESOURCE_LIMIT,
                        f"{grid}: about {estimate_mb:,.0f} MB to process "
                        f"({ESTIMATE_BASE_MB} MB and {BYTES_PER_VOXEL} bytes per voxel), more "
                        f"than this site's max_case_memory_mb ({budget.max_memory_mb:,})")


def cap_memory(max_memory_mb: int | None) -> None:
    """In a case's own process: let it allocate at most ``max_memory_mb`` more than it holds now
    (``RLIMIT_DATA``, which Linux applies to heap and anonymous mappings alike). An allocation
    past it fails (``MemoryError``, ITK's ``bad_alloc``) and the case is skipped. Elsewhere, or
    without a limit, nothing is set."""
    if not max_memory_mb or not hasattr(resource, "RLIMIT_DATA"):
        return
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return  # not Linux: RLIMIT_DATA would not count mmap'd memory
    held_kb = next((int(line.split()[1]) for line in status.splitlines()
                    if line.startswith("VmData:")), None)
    if held_kb is None:
        return
    limit = held_kb * 1024 + max_memory_mb * 2 ** 20
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def check_bins(levels: int, what: str) -> None:
    """Refuse a discretization into more than :data:`MAX_BINS` grey levels before pyradiomics
    builds its texture matrices (their size grows with the square)."""
    if levels > MAX_BINS:
        raise CaseError(SkipReason.RESOURCE_LIMIT,
                        f"{what} gives {levels:,} grey levels, more than {MAX_BINS:,}: widen "
                        "radiomics.bin_width or re-segment to a narrower range")


class CaseTimeout(BaseException):  # noqa: N818 - not an Exception, so pyradiomics' own
    # per-feature ``except Exception`` (a failed feature becomes NaN) cannot swallow it
    """One case ran past the site's time limit."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`CaseTimeout` in this block after ``seconds`` (None: no limit). The timer
    interrupts Python code between steps: a single long call into ITK ends first. Only in a
    process's main thread (extraction workers, the site CLI) and where the platform has
    ``SIGALRM``; elsewhere the block runs without a limit."""
    if (not seconds or not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
