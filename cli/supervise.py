"""The processes a ``myelofed`` command starts, watches or becomes (Flower's SuperLink and
SuperNode): started with their environment, waited for, stopped on the way out."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import NoReturn

from cli.console import console, fail_config
from common.errors import ConfigError
from server.processes import port_open


def become(command: list[str], env: Mapping[str, str]) -> NoReturn:
    """Become the Flower process (for systemd and containers: signals reach it directly)."""
    if shutil.which(command[0], path=env.get("PATH")) is None:
        fail_config(ConfigError(command[0], ["not found: install myelofed (it brings flwr)"]))
    sys.stdout.flush()
    os.execvpe(command[0], command, dict(env))


def start(command: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start ``command`` beside this process (it shares the terminal; no input)."""
    return subprocess.Popen(command, env=dict(env), stdin=subprocess.DEVNULL)


def wait_for_port(process: subprocess.Popen[bytes], host: str, port: int,
                  timeout_s: float = 60.0) -> bool:
    """Wait until ``host:port`` accepts connections: False when ``process`` exited first or
    ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while not port_open(host, port):
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def exited(process: subprocess.Popen[bytes], name: str) -> Callable[[], Awaitable[None]]:
    """A coroutine function that returns once ``process`` has exited, saying so (a server
    watches it to stop with it)."""

    async def watch() -> None:
        while process.poll() is None:
            await asyncio.sleep(0.5)
        console.print(f"[bold red]the {name} exited with {process.returncode}[/]")

    return watch


def stop(process: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM ``process`` if it still runs, SIGKILL it after ``grace_s``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
