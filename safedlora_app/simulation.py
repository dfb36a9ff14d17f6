"""Run the app through the real `flwr run` CLI on a private local SuperLink (free ports, own FLWR_HOME).

Used by the end-to-end tests and by ``safedlora compare``: every run goes through Flower's own
simulation exactly as a user's ``flwr run .`` does, and only the SuperLink started here is stopped.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil

APP_ROOT = Path(__file__).resolve().parents[1]  # the directory holding pyproject.toml
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalFlower:
    """`flwr run .` with its detached local SuperLink moved to free ports; stops only that SuperLink's tree."""

    def __init__(self, home: Path):
        self.home = home
        self.control_port, self.http_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(home),
            "FLWR_LOCAL_CONTROL_API_PORT": str(self.control_port),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.http_port),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }

    def run(self, run_config: str, timeout: float = 600, federation: str = "") -> subprocess.CompletedProcess:
        command = [str(BIN / "flwr"), "run", str(APP_ROOT), "--stream", "--run-config", run_config]
        if federation:
            command += ["--federation-config", federation]
        return subprocess.run(command, env=self.env, cwd=self.home, capture_output=True, text=True, timeout=timeout)

    def run_status(self, output: str) -> str:
        """The run's final status from `flwr ls --run-id N --format json` (`flwr run` exits 0 even on failure)."""
        run_id = _run_id(output)
        listing = subprocess.run([str(BIN / "flwr"), "ls", "--run-id", str(run_id), "--format", "json"],
                                 env=self.env, cwd=self.home, capture_output=True, text=True, timeout=60)
        runs = json.loads(listing.stdout)["runs"]
        return runs[0]["status"]

    def stop(self) -> None:
        needle = f"127.0.0.1:{self.control_port}"
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if any("flower-superlink" in part for part in cmdline) and needle in cmdline:
                tree = [process, *process.children(recursive=True)]
                for p in tree:
                    try:
                        p.terminate()
                    except psutil.NoSuchProcess:
                        pass
                _, alive = psutil.wait_procs(tree, timeout=15)
                for p in alive:
                    p.kill()


def _run_id(output: str) -> int:
    for line in output.splitlines():
        if "Starting logstream for run_id" in line:
            return int(line.split("`")[1])
    raise AssertionError(f"no run id in flwr output:\n{output[-3000:]}")
