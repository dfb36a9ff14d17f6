"""(d) The default `flwr run .`, timed whole, with where each round's time goes and its bytes against the floor.

    python bench/default_run.py [--run-config "KEY=VALUE ..."] [--federation-config "..."] [--keep DIR]

Runs the app with its defaults through the real `flwr run` on a private local SuperLink (startup
included in the wall time), then reads the run's metrics.jsonl:
- wall time of the whole command, and per round: seconds, central evaluation's share, aggregation's share;
- wire bytes of each LoRA round against the floor: every node receives and returns exactly
  ``sum_m r_m (d_in + d_out)`` values of factors (wire-dtype), plus the head's values. Goal: <= 1.02.
- accuracy: final, best, and the spread of the last four rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.supercore.constant import DEFAULT_SIMULATION_CONFIG

from safedlora_app.core.config import RunConfig
from safedlora_app.core.data import SENTIMENTS
from safedlora_app.core.model import adapted_modules, head_parameters, load_base_model, module_shapes
from safedlora_app.tools.simulation import LocalFlower


def floors(config: RunConfig) -> tuple[dict[str, int], int]:
    """``({module: d_in + d_out}, head values)`` of the default model."""
    base = load_base_model(config.model_name, config.task, SENTIMENTS, seed=config.seed)
    modules = adapted_modules(base, config.module_names(config.target_modules), ["classifier"])
    shapes = module_shapes(base, modules)
    params = dict(base.named_parameters())
    head = sum(params[n].numel() for n in head_parameters(base, config.module_names(config.head_modules)))
    return {m: d_out + d_in for m, (d_out, d_in) in shapes.items()}, head


def concurrent_clients(federation: str) -> int:
    """How many ClientApps Flower's Ray backend runs at once on this machine: its CPUs over
    ``client-resources-num-cpus`` (Flower 1.42's default: 2 CPUs per client, so one at a time on 2 cores)."""
    match = re.search(r"client-resources-num-cpus=([0-9.]+)", federation)
    per_client = float(match.group(1)) if match else DEFAULT_SIMULATION_CONFIG.client_resources_num_cpus
    if not per_client > 0:
        return 1
    return max(1, int(len(os.sched_getaffinity(0)) // per_client))  # the CPUs this process may use, as Ray counts


def where_a_round_goes(rows: list[dict], concurrent: int) -> str:
    """Medians over the rounds of each part of a round, and its fixed cost: what is neither the nodes' training
    nor central evaluation (issue #26: at most 1 s). The nodes' work counts once per wave of ``concurrent`` nodes."""
    def median(f) -> float:
        values = [f(r) for r in rows if all(r.get(k) is not None for k in ("client-seconds", "exchange-seconds"))]
        return statistics.median(values) if values else float("nan")

    def waves(r) -> int:
        return math.ceil(r["replies"] / concurrent)

    def fixed(r) -> float:
        return r["round-seconds"] - waves(r) * r["train-seconds"] - (r.get("eval-seconds") or 0.0)
    parts = {
        "training": median(lambda r: waves(r) * r["train-seconds"]),
        "node set-up and reply": median(lambda r: waves(r) * (r["client-seconds"] - r["train-seconds"])),
        "Flower messaging and scheduling": median(lambda r: r["exchange-seconds"] - waves(r) * r["client-seconds"]),
        "aggregation": median(lambda r: r["aggregate-seconds"]),
        "central evaluation": median(lambda r: r.get("eval-seconds") or 0.0),
        "server's other work (sampling, payloads, records, checkpoint)": median(lambda r: r["round-seconds"] - (
            r["exchange-seconds"] + r["aggregate-seconds"] + (r.get("eval-seconds") or 0.0))),
    }
    lines = [f"  {name}: {seconds:.2f} s" for name, seconds in parts.items()]
    return "\n".join([f"where a round goes (medians; {concurrent} node(s) at once, so the nodes' work counts once "
                       f"per {concurrent} node(s)):", *lines,
                       f"fixed cost of a round (neither training nor central evaluation): {median(fixed):.2f} s "
                       f"median, {100 * median(lambda r: fixed(r) / r['round-seconds']):.0f}% of a round "
                       f"(goal <= 1 s)"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", default="")
    parser.add_argument("--federation-config", default="")
    parser.add_argument("--keep", default=None, help="directory to keep the run's outputs in")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="safedlora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    flower = LocalFlower(work / "flwr-home")
    (work / "flwr-home").mkdir(exist_ok=True)
    settings = f"{args.run_config} out-dir='{work / 'runs'}' run-name='default' cache-dir='{work / 'cache'}'"
    start = time.perf_counter()
    try:
        result = flower.run(settings.strip(), timeout=3600, federation=args.federation_config)
        wall = time.perf_counter() - start
        status = flower.run_status(result.stdout + result.stderr)
    finally:
        flower.stop()
    if status != "finished:completed":
        raise SystemExit(f"run {status}:\n{(result.stdout + result.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (work / "runs" / "default" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((work / "runs" / "default" / "summary.json").read_text())
    config = RunConfig.from_mapping(json.loads((work / "runs" / "default" / "config.json").read_text())["effective"])
    trained = [r for r in rows if r["round"] > 0]
    print(f"`flwr run .` {args.run_config or '(defaults)'} {args.federation_config}: wall {wall:.1f} s "
          f"(ServerApp {summary['wall-seconds']:.1f} s, {len(trained)} rounds)")
    seconds = ", ".join(f"{r['round-seconds']:.1f}" for r in trained)
    print(f"round seconds: {seconds}")
    evaluated = [r for r in trained if r.get("eval-seconds")]
    if evaluated:  # runs of the app before eval-seconds was recorded have none
        print(f"central evaluation: {statistics.median(r['eval-seconds'] for r in evaluated):.2f} s per evaluation, "
              f"{100 * statistics.median(r['eval-seconds'] / r['round-seconds'] for r in evaluated):.1f}% of an "
              f"evaluated round (median); {len(evaluated)} of {len(trained)} rounds evaluated")
    aggregation = 100 * statistics.median(r["aggregate-seconds"] / r["round-seconds"] for r in trained)
    print(f"client training: {statistics.median(r['train-seconds'] for r in trained):.2f} s per client and round "
          f"(median); aggregation {aggregation:.2f}% of a round (median)")
    print(where_a_round_goes(trained, concurrent_clients(args.federation_config)))
    factor_values, head_values = floors(config)
    ratios, ratios_factors = [], []
    value_bytes = np.dtype(config.wire_dtype).itemsize
    for r in trained:
        if not r["ranks"]:
            continue
        per_node = sum(r["ranks"][m] * factor_values[m] for m in factor_values)
        floor = value_bytes * (r["nodes"] + r["replies"]) * per_node
        ratios_factors.append((r["bytes-down"] + r["bytes-up"]) / floor)
        head = value_bytes * (r["nodes"] + r["replies"]) * head_values
        ratios.append((r["bytes-down"] + r["bytes-up"]) / (floor + head))
    if ratios:
        print(f"wire bytes / floor (factors + head): median {statistics.median(ratios):.4f}, max {max(ratios):.4f} "
              f"(goal <= 1.02); / floor of the factors alone: median {statistics.median(ratios_factors):.4f}")
    accuracies = [r["accuracy"] for r in trained[-4:] if r["accuracy"] is not None]
    print(f"accuracy: final {summary['final-accuracy']:.1%}, best {summary['best-accuracy']:.1%}; last 4 rounds "
          f"{', '.join(f'{a:.1%}' for a in accuracies)} "
          f"(spread {100 * (max(accuracies) - min(accuracies)):.1f} points)")
    print(f"total sent {summary['total-mb']:.2f} MB; outputs in {work}")


if __name__ == "__main__":
    main()
