"""Run the app through the real `flwr run` CLI on a private local SuperLink (free ports, own FLWR_HOME).

Used by the end-to-end tests, the benchmarks and the lab (``safedlora compare``): every run goes through Flower's own
simulation exactly as a user's ``flwr run .`` does, and only the SuperLink started here is stopped.
The process helpers (free ports, the environment, a run's status, stopping a process tree) serve the
deployment tests too.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

APP_ROOT = Path(__file__).resolve().parents[2]  # the directory holding pyproject.toml
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment for Flower processes: a private FLWR_HOME, the venv's bin first (the SuperLink starts
    flower-superexec by name), no telemetry, update check, runtime installs or hub access."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **extra,
    }


def run_status(run_id: int | str, env: dict[str, str], cwd: Path, connection: str = "") -> str:
    """A run's status from `flwr ls [CONNECTION] --run-id N --format json` ('' while it is not listed)."""
    command = [str(BIN / "flwr"), "ls", *([connection] if connection else []), "--run-id", str(run_id),
               "--format", "json"]
    listing = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    try:
        runs = json.loads(listing.stdout).get("runs") or [{}]
    except json.JSONDecodeError:
        return ""
    return str(runs[0].get("status", ""))


def stop_processes(processes: list[psutil.Process], timeout: float = 20.0) -> None:
    """SIGTERM the given processes, wait up to ``timeout`` s, then SIGKILL what is left.

    psutil checks each process's creation time before signalling, so a reused PID is never hit.
    """
    for p in processes:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


class LocalFlower:
    """`flwr run .` with its detached local SuperLink moved to free ports; stops only that SuperLink's tree."""

    def __init__(self, home: Path):
        self.home = home
        self.control_port, self.http_port = free_port(), free_port()
        self.env = flower_env(home, FLWR_LOCAL_CONTROL_API_PORT=str(self.control_port),
                              FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(self.http_port))

    def run(self, run_config: str, timeout: float = 600, federation: str = "",
            progress: Path | None = None, app: Path = APP_ROOT) -> subprocess.CompletedProcess:
        """``flwr run`` of this app (or of another checkout of it, ``app``: Flower puts its directory first on the
        path, so its code runs); see :func:`run_watched` for ``timeout`` and ``progress``."""
        command = [str(BIN / "flwr"), "run", str(app), "--stream", "--run-config", run_config]
        if federation:
            command += ["--federation-config", federation]
        return run_watched(command, self.env, self.home, timeout, progress)

    def run_status(self, output: str) -> str:
        """The run's final status (`flwr run` exits 0 even on failure)."""
        return run_status(run_id(output), self.env, self.home)

    def processes(self) -> list[psutil.Process]:
        """The SuperLink started for this object (found by its control port) and all its descendants."""
        needle = f"127.0.0.1:{self.control_port}"
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if any("flower-superlink" in part for part in cmdline) and needle in cmdline:
                return [process, *process.children(recursive=True)]
        return []

    def stop(self) -> None:
        """Stop the SuperLink started for this object and its descendants."""
        stop_processes(self.processes(), timeout=15)


def run_watched(command: list[str], env: dict[str, str], cwd: Path, timeout: float,
                progress: Path | None = None, poll: float = 5.0) -> subprocess.CompletedProcess:
    """Run ``command`` to its end, capturing its output, unless it makes no progress for ``timeout`` seconds.

    Without ``progress``, ``timeout`` counts from the start. With it, it counts from the last change of that
    file (a run's ``metrics.jsonl`` grows every round), so that a run slowed down by a busy machine goes on and
    only a stuck one is stopped.

    Raises
    ------
    subprocess.TimeoutExpired
        After killing the process, with the output it had written.
    """
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    changed, seen = time.monotonic(), None
    while True:
        try:
            stdout, stderr = process.communicate(timeout=poll)  # retrying after a timeout loses no output
            return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            pass
        if progress is not None and progress.exists():
            stat = progress.stat()
            if (stamp := (stat.st_mtime_ns, stat.st_size)) != seen:
                changed, seen = time.monotonic(), stamp
        if time.monotonic() - changed > timeout:
            process.kill()
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)


def run_id(output: str) -> int:
    """The run id in `flwr run --stream` output."""
    match = re.search(r"Successfully started run (\d+)", output) or re.search(
        r"Starting logstream for run_id `(\d+)`", output)
    if not match:
        raise AssertionError(f"no run id in flwr output:\n{output[-3000:]}")
    return int(match.group(1))
