"""A Flower deployment on this machine: SuperLink and SuperNode processes, their logs, and the ``flwr`` CLI.

The one launcher of local federations from processes (the deployment and Compose tests, ``bench/many_supernodes.py``),
as :class:`~safedlora_app.tools.simulation.LocalFlower` is for ``flwr run``'s simulation. Every process starts in its
own session with its log in the work folder; :meth:`LocalDeployment.stop` stops only what was started here (and what
those processes started), by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

import psutil

from .simulation import BIN, flower_env, run_status, stop_processes


class LocalDeployment:
    """Processes of one local federation, their logs in ``work``, and the ``flwr`` CLI with a private FLWR_HOME
    (``work/flwr-home``, whose ``config.toml`` :meth:`connection` writes as a user does)."""

    def __init__(self, work: Path, **env: str):
        self.work = Path(work)
        self.home = self.work / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.home, PYTHONUNBUFFERED="1", **env)
        self.procs: dict[str, subprocess.Popen] = {}

    # --- processes ---
    def start(self, name: str, argv: Iterable, **env: str) -> subprocess.Popen:
        """Start ``argv`` as ``name`` (log: ``work/<name>.log``), in its own session so that :meth:`stop` reaches
        the children a crash orphans."""
        with open(self.work / f"{name}.log", "wb") as log:  # the child keeps its own handle
            self.procs[name] = subprocess.Popen(
                [str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.work, env={**self.env, **env}, start_new_session=True)
        return self.procs[name]

    def log(self, name: str, tail: int = 4000) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")[-tail:]

    def logs(self) -> str:
        return "\n".join(f"--- {n} (rc={p.poll()}) ---\n{self.log(n, 2500)}" for n, p in self.procs.items())

    def processes(self) -> list[psutil.Process]:
        """Every started process, its descendants, and what is left in its process group (children orphaned by a
        crash stay there)."""
        groups = {p.pid for p in self.procs.values()}
        found: dict[int, psutil.Process] = {}
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) in groups:
                    found[process.pid] = process
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        for p in self.procs.values():
            try:
                root = psutil.Process(p.pid)
                found.update({c.pid: c for c in [root, *root.children(recursive=True)]})
            except psutil.NoSuchProcess:
                pass
        return list(found.values())

    def stop(self, also: Iterable[psutil.Process] = ()) -> None:
        """Stop :meth:`processes` and ``also`` (e.g. processes seen earlier whose parent died), all recorded before
        the first signal; SuperNodes take a few seconds to shut down."""
        stop_processes(list({p.pid: p for p in [*self.processes(), *also]}.values()), timeout=20)
        for p in self.procs.values():
            try:
                p.wait(timeout=10)  # reaped: stop_processes has killed what did not stop
            except subprocess.TimeoutExpired:
                pass

    # --- the flwr CLI ---
    def connection(self, name: str, address: str, **options) -> None:
        """A ``[superlink.NAME]`` entry in FLWR_HOME/config.toml, as a user writes it."""
        lines = [f"[superlink.{name}]", f'address = "{address}"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
        with open(self.home / "config.toml", "a") as f:
            f.write("\n".join(lines) + "\n\n")

    def flwr(self, *args, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
        """``flwr ARGS`` with this federation's FLWR_HOME; ``check``: a non-zero exit raises ``RuntimeError``."""
        result = subprocess.run([str(BIN / "flwr"), *map(str, args)], capture_output=True, text=True, env=self.env,
                                cwd=self.work, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(map(str, args))}: {result.stdout}\n{result.stderr}")
        return result

    def flwr_json(self, *args, timeout: float = 120) -> dict:
        """``flwr ARGS --format json``; ``{"success": False, ...}`` when it answers no JSON or not in time."""
        try:
            out = self.flwr(*args, "--format", "json", timeout=timeout, check=False).stdout
        except subprocess.TimeoutExpired:
            return {"success": False, "output": f"no answer within {timeout} s"}
        try:
            return json.loads(out)
        except json.JSONDecodeError:
            return {"success": False, "output": out}

    def online_nodes(self, connection: str) -> set[str] | None:
        """Node ids the SuperLink lists as online, or None while it is not reachable."""
        data = self.flwr_json("supernode", "ls", connection)
        if not data.get("success"):
            return None
        return {str(n["node-id"]) for n in data["nodes"] if n["status"] == "online"}

    def run_status(self, run_id: int | str, connection: str) -> str:
        """A run's status ('' while it is not listed)."""
        return run_status(run_id, self.env, self.work, connection)
