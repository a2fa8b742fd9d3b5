"""The study app as Flower ships it to the sites: a ClientApp in deployment imports the project
from the bundle (``flwr run`` builds it from the repository), so everything the site code
needs at run time must be in the bundle, not only in the installed package."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

from common.report_templates import TEMPLATES

APP_DIR = Path(__file__).resolve().parents[2]


def test_the_report_templates_and_presets_travel_in_the_app_bundle(tmp_path: Path):
    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(APP_DIR))) as fab:
        names = set(fab.namelist())
        fab.extractall(tmp_path)
    assert "common/report_templates/__init__.py" in names
    assert {f"common/presets/{p}.toml" for p in ("spine_mri_t1w", "ibsi_digital_phantom")} \
        <= names
    assert not any(name.endswith(".j2") for name in names)
    # In a fresh interpreter that finds `common` in the bundle first (as a ClientApp does),
    # every template loads and a preset reads.
    script = ("import sys; sys.path.insert(0, sys.argv[1]);"
              "import common.templates as t, common.protocol as p;"
              "assert t.__file__.startswith(sys.argv[1]), t.__file__;"
              "[t._environment().get_template(n) for n in sys.argv[2:]];"
              "p.load_protocol('preset:spine_mri_t1w'); print('ok')")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), *TEMPLATES],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
