"""The exit status of every ``myelofed`` command: defined here once, listed in ``--help`` from
here."""

from __future__ import annotations

import enum
import textwrap


class ExitCode(enum.IntEnum):
    """Exit status of every ``myelofed`` command (documented in ``myelofed --help``)."""

    OK = 0
    """Everything asked for was done."""
    INTERNAL = 1
    """An unexpected error (a bug): the traceback is printed."""
    CONFIG = 2
    """The protocol, site config, manifest or command line is unusable; nothing was processed."""
    CASES_SKIPPED = 3
    """The run completed, but some cases were skipped (see the ingestion report)."""
    NO_USABLE_CASE = 4
    """The run completed, but no case was usable."""
    CHECK_FAILED = 5
    """A verification (e.g. ``myelofed ibsi-check``) found values that disagree."""
    STUDY_STOPPED = 6
    """A federated study stopped before its end (too few sites left; the reason is printed)."""


#: Each code in a few words, for ``myelofed --help``.
SUMMARY: dict[ExitCode, str] = {
    ExitCode.OK: "done",
    ExitCode.INTERNAL: "unexpected error",
    ExitCode.CONFIG: "unusable protocol/config/manifest",
    ExitCode.CASES_SKIPPED: "done but some cases skipped",
    ExitCode.NO_USABLE_CASE: "done but no usable case",
    ExitCode.CHECK_FAILED: "a verification found disagreeing values",
    ExitCode.STUDY_STOPPED: "a federated study stopped before its end",
}


def exit_codes_help(width: int = 95) -> str:
    """The ``Exit codes: 0 done; 1 ...`` paragraph of ``myelofed --help``, wrapped at
    ``width`` characters."""
    text = "Exit codes: " + "; ".join(f"{code.value} {SUMMARY[code]}" for code in ExitCode)
    return textwrap.fill(text + ".", width)
