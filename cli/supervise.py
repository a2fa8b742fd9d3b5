"""The processes a ``myelofed`` command starts, watches or becomes (Flower's SuperLink and
SuperNode): started with their environment, waited for, stopped on the way out."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import NoReturn

from cli.console import console, fail_config
from common.errors import ConfigError
from server.processes import OWNER_ENV, FlowerProcess, port_open, stop_processes


def become(command: list[str], env: Mapping[str, str]) -> NoReturn:
    """Become the Flower process (for systemd and containers: signals reach it directly)."""
    if shutil.which(command[0], path=env.get("PATH")) is None:
        fail_config(ConfigError(command[0], ["not found: install myelofed (it brings flwr)"]))
    sys.stdout.flush()
    os.execvpe(command[0], command, dict(env))


class Owned:
    """A process this command started, with everything it starts in turn: Flower's SuperLink
    starts SuperExec and a ServerApp per run, in sessions of their own. Each inherits a marker
    in its environment (:data:`server.processes.OWNER_ENV`), by which :meth:`stop` finds and
    stops them all, so no process of the coordinator outlives it (a restart on the same ports
    then works)."""

    def __init__(self, name: str, command: list[str], env: Mapping[str, str]) -> None:
        self.marker = uuid.uuid4().hex
        self.popen = subprocess.Popen(command, env={**env, OWNER_ENV: self.marker},
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        self.process = FlowerProcess(name, command, Path(os.devnull), self.popen)

    def poll(self) -> int | None:
        return self.popen.poll()

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process and all it started; SIGKILL what is left after ``grace_s``."""
        for line in stop_processes([self.process], self.marker, grace_s, OWNER_ENV):
            console.print(f"killed after {grace_s:g} s: {line}", highlight=False)


def start(name: str, command: list[str], env: Mapping[str, str]) -> Owned:
    """Start ``command`` beside this process (it shares the terminal; no input), owning it and
    every process it starts."""
    return Owned(name, command, env)


def exit_on_sigterm() -> None:
    """Make SIGTERM and SIGINT end this process by ``SystemExit`` (status 128 + the signal),
    so that ``finally`` blocks stop what it started, and nothing prints a traceback."""

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)


def wait_for_port(process: Owned, host: str, port: int,
                  timeout_s: float = 60.0) -> bool:
    """Wait until ``host:port`` accepts connections: False when ``process`` exited first or
    ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while not port_open(host, port):
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def exited(process: Owned, name: str) -> Callable[[], Awaitable[None]]:
    """A coroutine function that returns once ``process`` has exited, saying so (a server
    watches it to stop with it)."""

    async def watch() -> None:
        while process.poll() is None:
            await asyncio.sleep(0.5)
        console.print(f"[bold red]the {name} exited with {process.returncode}[/]")

    return watch
