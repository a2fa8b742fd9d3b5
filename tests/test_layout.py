from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The two apps and the records they exchange; and the two places that work on Flower's own
#: processes: the site's app allow-list inside its SuperNode, and the gateway that forwards
#: exactly Flower's Fleet API routes.
ALLOWED = {"client/app.py", "server/app.py", "common/records.py", "client/supernode.py",
           "server/gateway.py"}


def test_only_the_apps_the_records_and_the_process_hooks_import_flower():
    pattern = re.compile(r"^\s*(from|import)\s+flwr\b", re.MULTILINE)
    importers = {
        str(path.relative_to(ROOT))
        for package in ("common", "client", "server", "harmonization")
        for path in (ROOT / package).rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    }
    assert importers <= ALLOWED, sorted(importers - ALLOWED)
    assert importers == ALLOWED  # the check above is not vacuous
