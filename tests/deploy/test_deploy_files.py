"""The deployment kit is checked against the code: Docker cannot run here, so the files are
parsed and every command line, path, flag and config key in them is checked to exist."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from common.site_config import load_site_config
from server.study import StudySettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "site" / "Dockerfile", DEPLOY / "site" / "Dockerfile.cuda",
               DEPLOY / "coordinator" / "Dockerfile"]


def dockerfile(path: Path) -> dict[str, list]:
    """Instructions of a Dockerfile (continuations joined): name -> list of argument texts."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out: dict[str, list] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, rest = line.partition(" ")
            out.setdefault(name.upper(), []).append(rest.strip())
    return out


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def flags(command: list[str]) -> list[str]:
    return [c for c in command if c.startswith("--")]


def help_text(command: list[str]) -> str:
    """``--help`` of a myelofed command (run with this Python) or of a Flower executable."""
    if command[0] == "myelofed":
        command = [sys.executable, "-m", "cli.main", *command[1:]]
    elif shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not on PATH")
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    assert done.returncode == 0, done.stderr
    return done.stdout


SITE_JOIN = ["myelofed", "site", "join"]
SERVER_START = ["myelofed", "server", "start"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_dockerfiles_copy_what_exists_and_start_securely(path: Path) -> None:
    steps = dockerfile(path)
    for copy in steps["COPY"]:
        *sources, _ = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{path.name}: COPY {source}: not in the repository"
    entry = exec_form(steps["ENTRYPOINT"][-1])
    command = exec_form(steps["CMD"][-1])
    assert entry in (SITE_JOIN, SERVER_START), entry
    assert "--insecure" not in command and "--allow-any-app" not in command
    known = help_text(entry)
    for flag in flags(command):
        assert flag in known, f"{path.name}: {' '.join(entry)} has no option {flag}"
    if entry == SERVER_START:
        assert {"--secrets", "--state", "--port", "--control-port"} <= set(command)
        # only the gateway's port is exposed; the SuperLink's own stays on loopback
        assert steps["EXPOSE"] == [command[command.index("--port") + 1]]
        assert command[command.index("--control-port") + 1] not in steps["EXPOSE"]
    else:
        assert {"--ca", "--key", "--site-config"} <= set(command)
        assert "EXPOSE" not in steps
    env = " ".join(steps["ENV"])
    for variable in ("FLWR_TELEMETRY_ENABLED=0", "FLWR_DISABLE_UPDATE_CHECK=1",
                     "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1"):
        assert variable in env, f"{path.name}: {variable} not set"
    assert steps["USER"], f"{path.name}: runs as root"


def test_the_compose_federation_is_secure_and_its_files_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"superlink", "site_A", "site_B"}
    known = help_text(SITE_JOIN)
    for name, service in services.items():
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() in DOCKERFILES
        assert service["restart"] == "unless-stopped"  # a crashed process comes back
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./templates/"):
                assert (DEPLOY / source).is_file(), f"{name}: {source} missing"
        if name == "superlink":
            assert "ports" not in service  # the sites reach the gateway on the compose network
            secrets = [v.split(":")[0] for v in service["volumes"] if "/sites/" in v]
            assert secrets and all(v.endswith(".pub") for v in secrets)  # no site's private key
            continue
        command = service["command"]
        assert "--insecure" not in command and "--allow-any-app" not in command
        assert all(flag in known for flag in flags(command))
        assert command[command.index("--key") + 1].endswith(f"/{name}")
        config = next(v.split(":")[0] for v in service["volumes"] if v.endswith("site.toml:ro"))
        assert load_site_config(DEPLOY / config).site_name == name


def test_the_site_config_templates_load(tmp_path: Path) -> None:
    for name in ("site.toml", "site_A.toml", "site_B.toml"):
        config = load_site_config(DEPLOY / "templates" / name)
        assert config.site_name in ("site_A", "site_B") and config.manifest.is_absolute()


def test_the_run_config_template_is_the_apps_and_is_valid() -> None:
    template = tomllib.loads((DEPLOY / "templates" / "study-run.toml").read_text())
    app_keys = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"]
    assert set(template) <= set(app_keys), set(template) - set(app_keys)
    settings = StudySettings.from_run_config({**template, "protocol": "preset:spine_mri_t1w"})
    assert settings.until == "cnn" and settings.combat.min_cell == 5
