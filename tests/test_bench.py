"""bench/client_round.py, the per-step measurement docs/edge-devices.md quotes (emulated and native)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLIENT_ROUND = Path(__file__).resolve().parents[1] / "bench" / "client_round.py"


def client_round(*args, timeout=300):
    return subprocess.run([sys.executable, CLIENT_ROUND, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.e2e
def test_one_round_in_a_fresh_process_reports_each_step(tmp_path):
    out = client_round("--profile", "low-memory", "--rounds", "1", "--set", "local-samples=4",
                       "--set", f"cache-dir='{tmp_path}'",
                       "--set", "precision='fp32'", "--set", "torch-threads=2", "--op-profile", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["num-examples"] == 4 and result["peak-rss-mb"] > 100
    steps = ("import-seconds", "model-seconds", "data-seconds", "setup-seconds", "train-seconds")
    assert all(result[step] > 0 for step in steps), result
    assert result["seconds-per-sample"] == pytest.approx(result["train-seconds"] / 4, abs=2e-3)  # both rounded
    assert "aten::" in out.stderr  # the op profile


@pytest.mark.parametrize("item, message", [
    ("local-samples", "is not KEY=VALUE in TOML syntax"),
    ("precision=fp32", "is not KEY=VALUE in TOML syntax"),  # strings are quoted
    ("no-such-key=1", "unknown run-config key 'no-such-key'"),
])
def test_a_bad_override_is_refused_naming_it(item, message):
    out = client_round("--set", item, timeout=60)
    assert out.returncode == 2 and message in out.stderr, out.stderr
