"""The deployment kit is checked against the code: Docker cannot run here, so the files are
parsed and every command line, path, flag and config key in them is checked to exist."""

from __future__ import annotations

import functools
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
    return _help_text(tuple(command))


@functools.cache
def _help_text(command: tuple[str, ...]) -> str:
    command = list(command)
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


UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit's sections: name -> key -> values (in order)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_the_systemd_units_verify_run_the_cli_and_are_hardened(path: Path,
                                                                 tmp_path: Path) -> None:
    assert len(UNITS) == 2
    service = unit(path)["Service"]
    command = service["ExecStart"][0].split()
    assert command[0].endswith("/bin/myelofed")
    expected = SERVER_START if "coordinator" in path.name else SITE_JOIN
    assert ["myelofed", *command[1:3]] == expected
    known = help_text(expected)
    assert all(flag in known for flag in flags(command)), (flags(command), known)
    assert "--insecure" not in command and "--allow-any-app" not in command
    # stop: SIGTERM to the command, which stops what it started; then the rest is killed
    assert service["KillMode"] == ["mixed"] and service["Restart"][0] in ("always", "on-failure")
    assert service["User"] == ["myelofed"] and service["UMask"] == ["0077"]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
                      "CapabilityBoundingSet", "RestrictSUIDSGID", "ReadWritePaths"):
        assert hardening in service, hardening
    if "site" in path.name:
        assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # approvals re-read
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify with this installation's myelofed in place of /opt/myelofed/venv/bin/myelofed
    local = tmp_path / path.name
    local.write_text(path.read_text().replace(command[0], str(Path(sys.executable).parent /
                                                              "myelofed")))
    done = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True,
                          text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if local.name in line or "Unknown" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


def guide_commands() -> list[list[str]]:
    """Every ``myelofed ...`` command line in the deployment guide's code blocks (continuation
    lines joined, comments and placeholders left as they are)."""
    text = (DEPLOY / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split("#", 1)[0].strip()
            line = re.sub(r"^docker compose .*? (exec|run --rm) (--entrypoint myelofed )?"
                          r"\S+ ", "", line)
            if line.startswith("myelofed "):
                lines.append(line.split())
    return lines


def test_every_myelofed_command_in_the_guide_exists_with_its_options() -> None:
    commands = guide_commands()
    assert len(commands) >= 10
    for command in commands:
        words = [w for w in command if not w.startswith("-")]
        # the command's name: the words that are subcommands (up to the first argument)
        name = ["myelofed"]
        for word in words[1:3]:
            trial = help_text([*name, word]) if word.replace("-", "").isalpha() else ""
            if not trial:
                break
            name.append(word)
        known = help_text(name)
        missing = [f for f in flags(command) if f.split("=")[0] not in known]
        assert not missing, f"{' '.join(command)}: {missing} not in '{' '.join(name)} --help'"
