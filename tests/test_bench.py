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


def load_default_run():
    """bench/default_run.py as a module (bench/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("default_run", CLIENT_ROUND.parent / "default_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_row(server_round, seconds, train=(4.0, 5.0), client=(4.5, 5.5), exchange=6.0, evaluation=2.0):
    return {"round": server_round, "replies": 2, "round-seconds": seconds, "train-seconds": sum(train) / 2,
            "train-seconds-max": max(train), "train-seconds-total": sum(train), "client-seconds": sum(client) / 2,
            "client-seconds-total": sum(client), "exchange-seconds": exchange, "aggregate-seconds": 0.1,
            "eval-seconds": evaluation}


def test_the_default_run_bench_measures_rounds_against_their_floor():
    bench = load_default_run()
    rows = [bench_row(1, 11.0), bench_row(2, 7.7), bench_row(3, 7.0, evaluation=None)]
    both = bench.round_goals(rows, concurrent=2)
    # floors: the slowest node (5 s) + evaluation (2 s) = 7 s, and 5 s without evaluation
    assert "round / floor: 1.57, 1.10, 1.40 (worst 1.57, round 1; goal <= 1.1)" in both
    assert "round 1 / median later round: 1.50 (11.0 vs 7.3 s" in both
    assert "central evaluation: 15.6% of the rounds' time" in both  # 4 of 25.7 s
    assert "nodes at once (their ClientApp seconds over the exchange's): median 1.67 of 2" in both
    # one node at a time: the floor is both nodes' training, 9 s (+ 2 s)
    assert "round / floor: 1.00, 0.70, 0.78" in bench.round_goals(rows, concurrent=1)


def test_the_default_run_bench_times_the_readme_quickstart():
    readme = (CLIENT_ROUND.parents[1] / "README.md").read_text()
    quickstart = next(line for line in readme.splitlines() if "flwr run ." in line and "pip install" in line)
    federation = load_default_run().QUICKSTART_FEDERATION
    assert quickstart.endswith(f'flwr run . --stream --federation-config "{federation}"'), quickstart
