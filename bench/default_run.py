"""(d) The default `flwr run .`, timed whole, with where each round's time goes and its bytes against the floor.

    python bench/default_run.py [--run-config "KEY=VALUE ..."] [--federation-config "..."] [--keep DIR]
                                [--against REV]

Runs the app with its defaults through the real `flwr run` on a private local SuperLink (startup
included in the wall time), then reads the run's metrics.jsonl:
- wall time of the whole command, and per round: seconds, central evaluation's share, aggregation's share;
- issue #38's ratios: each round against its floor (the slowest parallel group's training plus central
  evaluation; goal <= 1.1), round 1 against the later rounds' median (goal <= 1.3), central evaluation's share of
  the rounds' time (goal <= 20%), and how many nodes trained at once;
- wire bytes of each LoRA round against the floor: every node receives and returns exactly
  ``sum_m r_m (d_in + d_out)`` values of factors (wire-dtype), plus the head's values. Goal: <= 1.02.
- accuracy: final, best, and the spread of the last four rounds.

``--against REV`` first runs the same command on a checkout of an earlier commit (a git worktree), then this
one, on the same machine, and prints this one's wall time and median round over the earlier one's.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.supercore.constant import DEFAULT_SIMULATION_CONFIG

from safedlora_app.core.config import RunConfig
from safedlora_app.core.data import SENTIMENTS
from safedlora_app.core.model import adapted_modules, head_parameters, module_shapes
from safedlora_app.core.run_folder import RunFolder
from safedlora_app.server.outputs import nodes_at_once
from safedlora_app.tasks import load_base_model
from safedlora_app.tools.simulation import APP_ROOT, LocalFlower

#: The README quickstart's federation: one CPU per simulated node, so that both nodes train at once on 2 cores.
QUICKSTART_FEDERATION = "client-resources-num-cpus=1"


def floors(config: RunConfig) -> tuple[dict[str, int], int]:
    """``({module: values per rank on the wire}, head values)`` of the default model (d_out + d_in; d_out alone
    under ``ffa-lora``, whose A never travels)."""
    base = load_base_model(config.model_name, config.task, SENTIMENTS, seed=config.seed)
    modules = adapted_modules(base, config.module_names(config.target_modules), ["classifier"])
    shapes = module_shapes(base, modules)
    params = dict(base.named_parameters())
    head = sum(params[n].numel() for n in head_parameters(base, config.module_names(config.head_modules)))
    return {m: d_out + (0 if config.frozen_a else d_in) for m, (d_out, d_in) in shapes.items()}, head


def concurrent_clients(federation: str) -> int:
    """How many ClientApps Flower's Ray backend runs at once on this machine: its CPUs over
    ``client-resources-num-cpus`` (Flower 1.42's default: 2 CPUs per client, so one at a time on 2 cores)."""
    match = re.search(r"client-resources-num-cpus=([0-9.]+)", federation)
    per_client = float(match.group(1)) if match else DEFAULT_SIMULATION_CONFIG.client_resources_num_cpus
    if not per_client > 0:
        return 1
    return max(1, int(len(os.sched_getaffinity(0)) // per_client))  # the CPUs this process may use, as Ray counts


def round_parts(rows: list[dict], concurrent: int) -> dict[str, float]:
    """Medians over ``rows`` of each part of a round; the nodes' work counts once per wave of ``concurrent`` nodes.
    The last entry is the round's fixed cost: what is neither the nodes' training nor central evaluation."""
    def median(f) -> float:
        values = [f(r) for r in rows if all(r.get(k) is not None for k in ("client-seconds", "exchange-seconds"))]
        return statistics.median(values) if values else float("nan")

    def waves(r) -> int:
        return math.ceil(r["replies"] / concurrent)
    return {
        "training": median(lambda r: waves(r) * r["train-seconds"]),
        "node set-up and reply": median(lambda r: waves(r) * (r["client-seconds"] - r["train-seconds"])),
        "Flower messaging and scheduling": median(lambda r: r["exchange-seconds"] - waves(r) * r["client-seconds"]),
        "aggregation": median(lambda r: r["aggregate-seconds"]),
        "central evaluation": median(lambda r: r.get("eval-seconds") or 0.0),
        "server's other work (sampling, payloads, records, checkpoint)": median(lambda r: r["round-seconds"] - (
            r["exchange-seconds"] + r["aggregate-seconds"] + (r.get("eval-seconds") or 0.0))),
        "fixed cost (neither training nor central evaluation)": median(
            lambda r: r["round-seconds"] - waves(r) * r["train-seconds"] - (r.get("eval-seconds") or 0.0)),
    }


def where_a_round_goes(rows: list[dict], concurrent: int) -> str:
    """Round 1 and the median later round, part by part (issue #26: a fixed cost of at most 1 s; issue #38:
    where round 1's extra time goes)."""
    first, later = round_parts(rows[:1], concurrent), round_parts(rows[1:], concurrent)
    lines = [f"  {name}: {first[name]:.2f} s | {later[name]:.2f} s" for name in first]
    return "\n".join([f"where a round goes, round 1 | median of the later rounds ({concurrent} node(s) at once, so "
                       f"the nodes' work counts once per {concurrent} node(s); goal for the fixed cost <= 1 s):",
                       *lines])


def round_goals(rows: list[dict], concurrent: int) -> str:
    """Issue #38's ratios. A round's floor is its slowest parallel group's training plus central evaluation:
    with every node at once, the slowest node's training; one at a time, the nodes' training summed."""
    def floor(r) -> float | None:
        if r.get("train-seconds-max") is None:  # a run of code older than these fields
            return None
        waves = math.ceil(r["replies"] / concurrent)
        training = r["train-seconds-total"] if concurrent == 1 else waves * r["train-seconds-max"]
        return training + (r.get("eval-seconds") or 0.0)

    lines = []
    ratios = [(r["round"], r["round-seconds"] / f) for r in rows if (f := floor(r))]
    if ratios:
        worst = max(ratios, key=lambda x: x[1])
        lines.append(f"round / floor: {', '.join(f'{x:.2f}' for _, x in ratios)} (worst {worst[1]:.2f}, round "
                     f"{worst[0]}; goal <= 1.1)")
    if len(rows) > 1:
        later = statistics.median(r["round-seconds"] for r in rows[1:])
        lines.append(f"round 1 / median later round: {rows[0]['round-seconds'] / later:.2f} "
                     f"({rows[0]['round-seconds']:.1f} vs {later:.1f} s; goal <= 1.3)")
    evaluation = sum(r.get("eval-seconds") or 0.0 for r in rows)
    lines.append(f"central evaluation: {100 * evaluation / sum(r['round-seconds'] for r in rows):.1f}% of the rounds' "
                 f"time (goal <= 20%)")
    if at_once := [x for r in rows if (x := nodes_at_once(r)) is not None]:
        lines.append(f"nodes at once (their ClientApp seconds over the exchange's): median "
                     f"{statistics.median(at_once):.2f} of {rows[-1]['replies']}")
    return "\n".join(lines)


def timed_run(app: Path, work: Path, run_config: str, federation: str) -> tuple[float, list[dict], dict, Path]:
    """``flwr run`` of ``app`` on a private local SuperLink: wall seconds, the trained rounds' metrics lines, the
    summary and the run's directory."""
    work.mkdir(parents=True, exist_ok=True)
    flower = LocalFlower(work / "flwr-home")
    (work / "flwr-home").mkdir(exist_ok=True)
    settings = f"{run_config} out-dir='{work / 'runs'}' run-name='default' cache-dir='{work / 'cache'}'"
    start = time.perf_counter()
    try:
        result = flower.run(settings.strip(), timeout=3600, federation=federation, app=app)
        wall = time.perf_counter() - start
        status = flower.run_status(result.stdout + result.stderr)
    finally:
        flower.stop()
    if status != "finished:completed":
        raise SystemExit(f"run of {app} {status}:\n{(result.stdout + result.stderr)[-3000:]}")
    run = work / "runs" / "default"
    return wall, RunFolder(run).rounds(), RunFolder(run).summary(), run


def earlier_checkout(rev: str, work: Path) -> Path:
    """A git worktree of ``rev`` (detached) under ``work``."""
    target = work / f"checkout-{rev}"
    subprocess.run(["git", "-C", APP_ROOT, "worktree", "add", "--detach", "--force", target, rev], check=True,
                   capture_output=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", default="")
    parser.add_argument("--federation-config", default=QUICKSTART_FEDERATION,
                        help=f"default: the README quickstart's, {QUICKSTART_FEDERATION!r}; \"\" for Flower's own "
                             "(2 CPUs per node)")
    parser.add_argument("--keep", default=None, help="directory to keep the run's outputs in")
    parser.add_argument("--against", default=None, metavar="REV",
                        help="also run an earlier commit (first), and print this code's times over its")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="safedlora-bench-"))
    earlier = None
    if args.against:
        checkout = earlier_checkout(args.against, work)
        try:
            earlier = timed_run(checkout, work / "earlier", args.run_config, args.federation_config)
        finally:
            subprocess.run(["git", "-C", APP_ROOT, "worktree", "remove", "--force", checkout], capture_output=True)
    wall, trained, summary, run = timed_run(APP_ROOT, work / "this", args.run_config, args.federation_config)
    config = RunConfig.from_mapping(RunFolder(run).effective())
    print(f"`flwr run .` {args.run_config or '(defaults)'} {args.federation_config}: wall {wall:.1f} s "
          f"(ServerApp {summary['wall-seconds']:.1f} s, {len(trained)} rounds)")
    seconds = ", ".join(f"{r['round-seconds']:.1f}" for r in trained)
    print(f"round seconds: {seconds}")
    if earlier:
        old_wall, old_rows = earlier[0], earlier[1]
        median, old_median = (statistics.median(r["round-seconds"] for r in rows[1:]) for rows in (trained, old_rows))
        print(f"this code / {args.against}: wall {wall / old_wall:.2f}x ({wall:.1f} vs {old_wall:.1f} s), median "
              f"round after the first {median / old_median:.2f}x ({median:.1f} vs {old_median:.1f} s), final "
              f"accuracy {summary['final-accuracy']:.1%} vs {earlier[2]['final-accuracy']:.1%}")
    concurrent = concurrent_clients(args.federation_config)
    print(round_goals(trained, concurrent))
    evaluated = [r for r in trained if r.get("eval-seconds")]
    if evaluated:
        print(f"central evaluation: {statistics.median(r['eval-seconds'] for r in evaluated):.2f} s per evaluation, "
              f"{100 * statistics.median(r['eval-seconds'] / r['round-seconds'] for r in evaluated):.1f}% of an "
              f"evaluated round (median); {len(evaluated)} of {len(trained)} rounds evaluated")
    aggregation = 100 * statistics.median(r["aggregate-seconds"] / r["round-seconds"] for r in trained)
    print(f"client training: {statistics.median(r['train-seconds'] for r in trained):.2f} s per client and round "
          f"(median); aggregation {aggregation:.2f}% of a round (median)")
    print(where_a_round_goes(trained, concurrent))
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
