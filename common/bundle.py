"""The study app's bundle and its hash: what a site approves before a run's code may run.

``flwr run`` bundles the app folder (the one with the app's ``pyproject.toml``) into a FAB and
sends it to every site; Flower builds a FAB reproducibly (same files, same bytes), so its
SHA-256 names one version of the app. The coordinator announces it with the study
(``myelofed app-hash``), each site lists it in its config's ``approved_apps``, and the site's
SuperNode (:mod:`client.supernode`) refuses any run whose bundle has another hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flwr.cli.build import build_fab_from_disk


def app_hash(app_dir: Path) -> str:
    """The SHA-256 (hex) of the app bundle Flower builds from ``app_dir`` for ``flwr run``
    (the folder with the app's pyproject.toml): what a site approves."""
    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def is_app_hash(text: str) -> bool:
    """Whether ``text`` is an app hash as :func:`app_hash` writes it (64 lower-case hex
    digits)."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)
