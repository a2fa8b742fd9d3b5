"""Start Flower's processes, wait until they are ready, and stop them with all they started.

Flower starts processes of its own (SuperExec, the ServerApp and every ClientApp), some in new
sessions, so killing our process groups is not enough: every process gets a marker variable
(:data:`MARKER_ENV`) in its environment, which Flower's children inherit, and
:func:`processes_marked` finds them all by it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil

from common.errors import MyeloFedError
from server.commands import LOOPBACK

#: The environment variable that marks every process of one federation (and Flower's children).
MARKER_ENV: Final = "MYELOFED_FEDERATION_ID"
#: The one that marks every process a ``myelofed`` command started (and theirs), so that the
#: command stops them all on its way out (:class:`cli.supervise.Owned`).
OWNER_ENV: Final = "MYELOFED_OWNER_ID"

#: What a SuperNode logs once the SuperLink has accepted it (Flower 1.42).
SUPERNODE_CONNECTED: Final = re.compile(r"SuperNode ID: \d+")

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class FederationError(MyeloFedError):
    """A Flower process did not start, did not get ready in time, or a run did not end in
    time. The message carries the tail of each process's log."""


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct TCP ports free on ``host`` now (held together while chosen, so they
    differ; another program could still take one before Flower binds it)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, colour codes removed ("" when absent)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(_ANSI.sub("", text).splitlines()[-lines:])


@dataclass
class FlowerProcess:
    """One started executable: its name, command, log file and ``Popen`` (in its own process
    group, so a signal reaches the children that stay in it)."""

    name: str
    command: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    @classmethod
    def start(cls, name: str, command: Sequence[str], log_path: Path, env: Mapping[str, str],
              cwd: Path | None = None, nice: int = 0) -> FlowerProcess:
        """Start ``command`` with stdout and stderr into ``log_path`` (which starts with the
        command line), at scheduling priority ``nice`` (its children inherit it)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            log.write(("$ " + " ".join(command) + "\n").encode())
            log.flush()
            popen = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=dict(env), cwd=cwd,
                                     start_new_session=True,
                                     preexec_fn=(lambda: os.nice(nice)) if nice else None)
        return cls(name, list(command), log_path, popen)

    def tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def describe(self, lines: int = 40) -> str:
        """Name, state and log tail, for an error message."""
        code = self.popen.poll()
        state = "running" if code is None else f"exited with {code}"
        return f"--- {self.name} ({state}; log {self.log_path}) ---\n{self.tail(lines)}"

    def wait_ready(self, timeout_s: float, *, port: tuple[str, int] | None = None,
                   log_pattern: re.Pattern[str] | None = None) -> None:
        """Wait until ``port`` accepts connections and ``log_pattern`` is in the log; raise
        :class:`FederationError` (with the log tail) when the process exits or time is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            port_ok = port is None or port_open(*port)
            log_ok = log_pattern is None or bool(log_pattern.search(self.tail(10_000)))
            if port_ok and log_ok:
                return
            if self.popen.poll() is not None:
                raise FederationError(f"{self.name} exited with {self.popen.returncode} before "
                                      f"it was ready\n{self.describe()}")
            if time.monotonic() > deadline:
                waited = " and ".join(filter(None, [
                    f"port {port[0]}:{port[1]}" if port is not None and not port_ok else "",
                    f"log line /{log_pattern.pattern}/"
                    if log_pattern is not None and not log_ok else ""]))
                raise FederationError(f"{self.name} not ready after {timeout_s:g} s (waited "
                                      f"for {waited})\n{self.describe()}")
            time.sleep(0.2)


def processes_marked(marker: str, variable: str = MARKER_ENV) -> list[psutil.Process]:
    """This user's processes whose environment has ``variable=marker``."""
    found = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != os.getuid():
                continue
            if proc.environ().get(variable) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_processes(processes: Iterable[FlowerProcess], marker: str | None = None,
                   grace_s: float = 10.0, variable: str = MARKER_ENV) -> list[str]:
    """Stop ``processes`` with everything they started: SIGTERM to each process group, each
    descendant and each process marked with ``variable=marker``; SIGKILL to those alive after
    ``grace_s``. Returns a line for each process that had to be killed."""
    processes = list(processes)
    killed: list[str] = []
    for _ in range(3):  # a process may start a child while we stop its parent: look again
        targets = _targets(processes, marker, variable)
        if not targets:
            break
        groups = {_pgid(p) for p in processes if p.popen.poll() is None}
        for group in groups:
            if group is not None:
                _signal_group(group, signal.SIGTERM)
        for proc in targets:
            _signal(proc, signal.SIGTERM)
        _, alive = psutil.wait_procs(targets, timeout=grace_s)
        for proc in alive:
            killed.append(_describe_proc(proc))
            _signal(proc, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
    for process in processes:  # reap our own children (no zombies)
        try:
            process.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _signal_group(process.popen.pid, signal.SIGKILL)
            process.popen.wait(timeout=5)
    return killed


def kill_now(process: FlowerProcess) -> None:
    """SIGKILL ``process`` and every process it started (a crash or a pulled cable: no
    goodbye), and reap it."""
    for proc in _targets([process], None, MARKER_ENV):
        _signal(proc, signal.SIGKILL)
    process.popen.wait(timeout=30)


def _targets(processes: list[FlowerProcess], marker: str | None, variable: str
             ) -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for process in processes:
        if process.popen.poll() is not None:
            continue
        try:
            root = psutil.Process(process.popen.pid)
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc
        except psutil.NoSuchProcess:
            continue
    for proc in processes_marked(marker, variable) if marker else []:
        found.setdefault(proc.pid, proc)
    return [p for p in found.values() if _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _pgid(process: FlowerProcess) -> int | None:
    try:
        return os.getpgid(process.popen.pid)
    except ProcessLookupError:
        return None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    if pgid == os.getpgrp():  # never our own group
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal(proc: psutil.Process, sig: signal.Signals) -> None:
    try:
        proc.send_signal(sig)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


def _describe_proc(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid}: {' '.join(proc.cmdline())[:200]}"
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return str(proc.pid)
