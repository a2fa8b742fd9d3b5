from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from common.site_config import load_site_config


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "site.toml"
    path.write_text('site_name = "hospital_A"\nmanifest = "data/cases.csv"\nworkers = 2\n')
    config = load_site_config(path)
    assert config.manifest == tmp_path / "conf" / "data" / "cases.csv"
    assert config.work_dir == tmp_path / "conf" / "myelofed-work"
    assert config.n_workers == 2 and config.device == "auto"


def test_bad_site_config_names_the_field(tmp_path: Path):
    path = tmp_path / "site.yaml"
    path.write_text("site_name: 'a b'\nmanifest: m.csv\nworkers: 0\ndevice: tpu\n"
                    "approved_apps: ['" + "A" * 64 + "']\n")
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    fields = {p.split(":")[0] for p in err.value.problems}
    assert fields == {"site_name", "workers", "device", "approved_apps.0"}


def test_approved_apps_are_sha256_digests(tmp_path: Path):
    path = tmp_path / "site.toml"
    digest = "0123456789abcdef" * 4
    path.write_text(f'site_name = "A"\nmanifest = "m.csv"\napproved_apps = ["{digest}"]\n')
    assert load_site_config(path).approved_apps == (digest,)
