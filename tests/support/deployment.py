"""Real SuperLink and SuperNode processes on loopback, driven with the ``flwr`` CLI of a private FLWR_HOME
(test_deployment.py, test_compose.py, test_arm64.py)."""

import os
import re
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from safedlora_app.core.run_folder import RunFolder
from safedlora_app.tools.deployment import LocalDeployment
from safedlora_app.tools.simulation import free_port

ROOT = Path(__file__).resolve().parents[2]
APP_DIR = Path(os.environ.get("SAFEDLORA_DEPLOY_APP_DIR", ROOT)).resolve()
MAKE_CERTS = ROOT / "scripts" / "make-certs.sh"


# s for one `flwr run --stream` of 2 tiny rounds: ~100 s on 2 idle cores, 154-333 s measured in CI's slow tier
# (4 workers on 2 cores, Docker builds beside it). The tests assert that a run completes, not how fast.
RUN_TIMEOUT = 600
START_TIMEOUT = 60  # s for processes to come up / nodes to connect


# 2 rounds of the real model on a few samples. The app needs heat + cool rounds to fit into the
# num-server-rounds - init-rounds annealing rounds; node-wait-timeout bounds a missing node.
TINY = ("num-server-rounds=2 init-rounds=1 heat-rounds=0 cool-rounds=1 rank-max=2 rank-min=1 "
        "local-samples=16 test-size=32 val-size=32 batch-size=8 eval-batch-size=32 min-nodes=2 "
        "node-wait-timeout=60")


def app_missing():
    """The app's component modules, as declared in its pyproject, that do not exist yet."""
    pyproject = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    components = pyproject["tool"]["flwr"]["app"]["components"].values()
    files = [APP_DIR / (c.split(":")[0].replace(".", "/") + ".py") for c in components]
    return [str(f) for f in files if not f.exists()]


def free_ports(n):
    """``n`` distinct free ports."""
    ports = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


class Deployment(LocalDeployment):
    """The app's launcher of local federations (``tools/deployment.py``) with a test's waits and checks."""

    def __init__(self, tmp):
        super().__init__(tmp, HF_HOME=str(tmp / "hf-home"))
        self.tmp = tmp

    def wait_for(self, check, what, timeout=START_TIMEOUT, alive=()):
        """Poll `check` until truthy; fail early if a process in `alive` has exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in alive:
                if self.procs[name].poll() is not None:
                    pytest.fail(f"{name} exited while waiting for {what}\n{self.logs()}")
            if result := check():
                return result
            time.sleep(0.5)
        pytest.fail(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")

    def flwr(self, *args, timeout=60, check=True):  # a test's flwr command must succeed unless it says otherwise
        return super().flwr(*args, timeout=timeout, check=check)

    def launch(self, conn, run_name, settings="", app_dir=APP_DIR):
        """Start `flwr run APP CONN --stream` of the tiny settings (plus ``settings``) in the background."""
        out_dir = self.tmp / "out"
        items = dict(item.split("=", 1) for item in f"{TINY} {settings}".split())  # Flower refuses repeated keys
        config = " ".join(f"{k}={v}" for k, v in items.items())
        config += f" cache-dir='{self.tmp / 'cache'}' out-dir='{out_dir}' run-name='{run_name}'"
        log = self.tmp / f"flwr-run-{run_name}.log"
        with open(log, "wb") as f:
            cli = subprocess.Popen(["flwr", "run", str(app_dir), conn, "--stream", "--run-config", config],
                                   stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=self.env, cwd=self.tmp)
        return cli, log, out_dir / run_name

    def wait_rounds(self, outputs, rounds, cli, log, alive=()):
        """Wait until the launched run has written ``rounds`` rounds (after round 0) to metrics.jsonl."""
        def written():
            if cli.poll() is not None:
                pytest.fail(f"flwr run exited early\n{log.read_text(errors='replace')[-4000:]}\n{self.logs()}")
            return len(metrics_rows(outputs)) > rounds
        self.wait_for(written, f"round {rounds} to end", timeout=RUN_TIMEOUT, alive=alive)

    def complete(self, conn, cli, log, alive=()):
        """Wait for a launched run; assert it finished:completed; return its log text."""
        try:
            cli.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            cli.kill()
            pytest.fail(f"flwr run took over {RUN_TIMEOUT}s\n{log.read_text()[-4000:]}\n{self.logs()}")
        text = log.read_text(errors="replace")
        started = re.search(r"Successfully started run (\d+)", text)
        assert cli.returncode == 0 and started, text[-4000:]
        run_id = started.group(1)

        # `flwr run` exits 0 even when the run failed: the run's status is the verdict.
        def finished():
            status = self.run_status(run_id, conn)
            return status if status.startswith("finished") else None

        status = self.wait_for(finished, f"run {run_id} to finish", timeout=60, alive=alive)
        assert status == "finished:completed", f"{status}\n{text[-4000:]}\n{self.logs()}"
        self.last_run_log = text
        return text

    def run_app(self, conn, run_name, alive=(), settings=""):
        """`flwr run APP CONN --stream` of 2 tiny rounds (plus ``settings``); returns the run's output dir."""
        cli, log, outputs = self.launch(conn, run_name, settings)
        self.complete(conn, cli, log, alive=alive)
        # The ServerApp wrote its outputs where it was told, and both SuperNodes trained.
        rows = RunFolder(outputs).records()
        assert [row["round"] for row in rows][-1] == 2
        assert all(row["replies"] == 2 for row in rows if row["round"] >= 1), rows
        assert RunFolder(outputs).summary()["rounds"] == 2
        return outputs


def metrics_rows(outputs):
    return RunFolder(outputs).records()
