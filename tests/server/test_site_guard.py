"""A site runs only the study apps it approved: an app whose bundle hash is not in its
allow-list is refused before any of its code runs, with a log line at the site and a named
reason at the coordinator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from client.supernode import main
from common.bundle import app_hash, is_app_hash
from server.commands import approving
from server.federation import LocalFederation
from server.processes import SUPERNODE_CONNECTED

APP_DIR = Path(__file__).resolve().parents[2]


def test_the_guard_needs_an_allow_list_or_an_explicit_opt_out(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as no_list:
        main(["--site", "site_A", "--", "--insecure"])
    assert no_list.value.code == 2 and "--allow-any-app" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--site", "site_A", "--approve", "ABC", "--", "--insecure"])
    assert "not a SHA-256" in capsys.readouterr().err
    command = approving(["flower-supernode", "--superlink", "h:1"], "site_A", ["a" * 64])
    assert command[-5:] == ["--approve", "a" * 64, "--", "--superlink", "h:1"]
    with pytest.raises(ValueError, match="not a flower-supernode"):
        approving(["flower-superlink"], "site_A", None)


def test_the_app_hash_is_reproducible(tmp_path: Path):
    first, second = app_hash(APP_DIR), app_hash(APP_DIR)
    assert first == second and is_app_hash(first)
    app = tmp_path / "app"  # one changed file changes the hash
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", "tests"))
    before = app_hash(app)
    (app / "client" / "app.py").write_text((app / "client" / "app.py").read_text() + "\n# x\n")
    assert app_hash(app) != before


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flower-superlink") is None,
                    reason="flower-superlink is not installed")
def test_an_unapproved_app_is_refused_before_it_runs(tmp_path: Path):
    configs = {}
    for site in ("site_A", "site_B"):
        configs[site] = tmp_path / f"{site}.toml"
        configs[site].write_text(f'site_name = "{site}"\nmanifest = "{site}.csv"\n'
                                 f'work_dir = "{site}-work"\n')
    out = tmp_path / "out"
    with LocalFederation(APP_DIR, {"site_B": configs["site_B"]},
                         tmp_path / "federation") as federation:
        refusing = federation.start_node("site_A", configs["site_A"],
                                         approved_apps=("0" * 64,))
        refusing.wait_ready(60, log_pattern=SUPERNODE_CONNECTED)
        result = federation.run({"out-dir": str(out), "until": "handshake", "min-sites": 2,
                                 "timeout-s": 60.0}, timeout_s=300)
        refused_log, approved_log = refusing.tail(400), next(
            p for p in federation.processes if p.name == "supernode-site_B").tail(400)
    digest = app_hash(APP_DIR)
    assert f"site site_A refuses run {result.run_id}: its app {digest}" in refused_log
    assert "is not in the site's approved_apps" in refused_log
    assert "refuses" not in approved_log
    assert not (tmp_path / "site_A-work").exists()  # nothing of the app ran at site_A
    handshake = json.loads((out / "handshake.json").read_text())
    reasons = json.dumps(handshake)
    assert "site site_A refuses run" in reasons and "approved_apps" in reasons, reasons


def test_approvals_are_read_again_from_the_site_config_on_reload(tmp_path: Path):
    """SIGHUP (systemctl reload) takes a new release's hash without a restart; a config that
    no longer loads, or approves nothing, leaves the approvals as they were."""
    from client.supernode import Approvals

    config = tmp_path / "site.toml"
    approvals = Approvals(frozenset(["a" * 64]), config)
    config.write_text(f'site_name = "site_A"\nmanifest = "m.csv"\napproved_apps = ["{"b" * 64}"]\n')
    approvals.reload()
    assert "b" * 64 in approvals and "a" * 64 not in approvals
    for broken in ('site_name = "site_A"\nmanifest = "m.csv"\napproved_apps = ["nope"]\n',
                   'site_name = "site_A"\nmanifest = "m.csv"\napproved_apps = []\n'):
        config.write_text(broken)
        approvals.reload()
        assert "b" * 64 in approvals
    assert approving(["flower-supernode"], "site_A", ["c" * 64], config)[-4:] == [
        "c" * 64, "--site-config", str(config), "--"]
