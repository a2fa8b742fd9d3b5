"""The resource limits a site holds every case to, checked before anything sized by the input is
allocated: an image's voxels (from its header), the grid it is resampled to, and the grey levels
of its discretization."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from common.errors import MAX_CASE_VOXELS, CaseError, SkipReason
from common.protocol import MAX_BINS

__all__ = ["MAX_BINS", "MAX_CASE_VOXELS", "CaseTimeout", "check_bins", "check_voxels",
           "time_limit"]


def check_voxels(size: Sequence[int], what: str, max_voxels: int = MAX_CASE_VOXELS) -> None:
    """Refuse a grid of more than ``max_voxels`` voxels (``resource_limit``) before it is
    allocated."""
    voxels = 1
    for n in size:
        voxels *= int(n)
    if voxels > max_voxels:
        raise CaseError(SkipReason.RESOURCE_LIMIT,
                        f"{what} has {' x '.join(str(int(n)) for n in size)} = {voxels:,} voxels, "
                        f"more than this site's max_case_voxels ({max_voxels:,})")


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
