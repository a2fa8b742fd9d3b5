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


def test_a_release_is_one_fab_whose_unpacked_folder_flower_ships_byte_for_byte(tmp_path: Path):
    """release -> announce -> approve -> run: the .fab's hash is the one 'myelofed app-hash'
    prints for the checkout and for the .fab, and 'flwr run' of the unpacked folder ships the
    same bytes; a tampered or hostile bundle is refused by name."""
    import pytest

    from common.bundle import app_hash, build_release, bundle_hash, unpack
    from common.errors import ConfigError

    fab, digest = build_release(APP_DIR, tmp_path / "release")
    assert digest == app_hash(APP_DIR) == bundle_hash(fab) == bundle_hash(APP_DIR)
    assert fab.name == f"myelofed-{digest[:12]}.fab"
    assert fab.with_suffix(".sha256").read_text() == f"{digest}  {fab.name}\n"
    assert unpack(fab, tmp_path / "app") == digest
    assert app_hash(tmp_path / "app") == digest
    with pytest.raises(ConfigError, match="not empty"):
        unpack(fab, tmp_path / "app")
    # a bundle that is not Flower's own of its files (one edited after the release) is refused
    with zipfile.ZipFile(fab) as original, zipfile.ZipFile(tmp_path / "tampered.fab", "w") as out:
        for item in original.infolist():
            data = original.read(item)
            out.writestr(item, data + b"\n# changed" if item.filename == "client/app.py"
                         else data)
    with pytest.raises(ConfigError, match="bundles to"):
        unpack(tmp_path / "tampered.fab", tmp_path / "tampered")
    with zipfile.ZipFile(tmp_path / "evil.fab", "w") as out:
        out.writestr("../outside.py", "print('x')")
    with pytest.raises(ConfigError, match="points outside the folder"):
        unpack(tmp_path / "evil.fab", tmp_path / "evil")
    assert not (tmp_path / "outside.py").exists()
    (tmp_path / "junk.fab").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a Flower app bundle"):
        unpack(tmp_path / "junk.fab", tmp_path / "junk")
