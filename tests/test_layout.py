from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"client/app.py", "server/app.py", "common/records.py"}


def test_only_the_apps_and_the_record_module_import_flower():
    pattern = re.compile(r"^\s*(from|import)\s+flwr\b", re.MULTILINE)
    importers = {
        str(path.relative_to(ROOT))
        for package in ("common", "client", "server", "harmonization")
        for path in (ROOT / package).rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    }
    assert importers <= ALLOWED, sorted(importers - ALLOWED)
    assert importers == ALLOWED  # the check above is not vacuous
