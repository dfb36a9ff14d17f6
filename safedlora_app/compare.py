"""``safedlora compare``: every method side by side on the same seeds, partitions, rounds and evaluation.

One invocation plans a set of runs (split x method x seed [x learning rate]), runs each one through
the real ``flwr run`` CLI on a private local SuperLink (:class:`~safedlora_app.simulation.LocalFlower`,
Flower's own simulation: no second implementation of anything), and aggregates what the app wrote
(``metrics.jsonl``, ``summary.json``) into tables, plots and ``comparison.json``::

    safedlora compare [--quick] [--name NAME] [--out DIR] [--seeds N] [--methods m1,m2]
                      [--splits natural,dirichlet] [--rounds T] [--lr-search]
                      [--target-accuracy A] [--set KEY=VALUE ...] [--dry-run]

Layout of ``<out>/<name>/``::

    runs/<split>/<method>-s<seed>/       the app's run directories (config, metrics.jsonl, summary.json, ...)
    runs/<split>/<method>-lrx<m>-s<seed>/  runs at another learning-rate multiplier (``--lr-search``)
    logs/<split>/<run>.log               the ``flwr run --stream`` output of each run
    aborted/                             half-finished run directories moved aside on resume
    plots/<split>/*.png                  accuracy vs round / vs cumulative MB, budget, sa-fedlora's ranks
    table.csv, table.md                  one row per split + method
    comparison.json                      everything: commands, settings, chosen lrs, machine, rows

Resuming: a run whose ``summary.json`` exists is skipped (after checking that it was made with the
same settings); a run directory without one (a run that was interrupted) is moved to ``aborted/``
and the run is done again.

The module is pure functions (planning, aggregation, formatting) plus a thin runner (:func:`main`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

MB = 1e6

# --- Methods and splits -------------------------------------------------------------------------
#: label -> run-config overrides. ``"{rank-min}"`` is replaced by the settings' rank-min.
METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {"method": "fedavg"},
    "fedprox": {"method": "fedprox"},
    "fedit-rmax": {"method": "fedit"},
    "fedit-rmin": {"method": "fedit", "rank-max": "{rank-min}"},
    "sa-fedlora": {"method": "sa-fedlora"},
    "sa-no-init": {"method": "sa-fedlora", "init-rounds": 0},
    "sa-no-anneal": {"method": "sa-fedlora", "schedule": "constant"},
    "sa-uniform": {"method": "sa-fedlora", "allocation": "uniform"},
    "sa-ab-avg": {"method": "sa-fedlora", "aggregation": "fedavg"},
}
METHOD_DESCRIPTIONS = {
    "fedavg": "full fine-tuning (FedAvg)",
    "fedprox": "full fine-tuning + proximal term (FedProx)",
    "fedit-rmax": "LoRA at fixed rank-max, A/B averaged (FedIT)",
    "fedit-rmin": "LoRA at fixed rank-min, A/B averaged (FedIT)",
    "sa-fedlora": "SA-FedLoRA",
    "sa-no-init": "SA-FedLoRA without initiating stage (init-rounds=0)",
    "sa-no-anneal": "SA-FedLoRA without annealing (schedule='constant')",
    "sa-uniform": "SA-FedLoRA with uniform allocation",
    "sa-ab-avg": "SA-FedLoRA with separate A/B averaging (aggregation='fedavg')",
}
FULL_METHODS = ("fedavg", "fedprox")
#: Methods repeated over every seed; the others run on the first seed only.
HEADLINE = ("fedavg", "fedit-rmax", "sa-fedlora")
#: Byte savings are reported against these (per split).
REFERENCES = ("fedavg", "fedit-rmax")

#: split -> (run-config settings, number of supernodes). Same for every method.
SPLITS: dict[str, tuple[dict[str, Any], int]] = {
    # One client per topic of the default tweets (7 topics, see data.TOPICS).
    "natural": ({"partitioner": "natural"}, 7),
    # Label skew; 7 clients too, so the two splits differ in the kind of heterogeneity only.
    "dirichlet": ({"partitioner": "dirichlet", "dirichlet-alpha": 0.5}, 7),
}
FEDERATION = "num-supernodes={n} client-resources-num-cpus=1"
LR_GRID = (0.5, 1.0, 2.0)
FIRST_SEED = 42


@dataclass(frozen=True)
class Preset:
    """What one comparison runs, apart from the per-method and per-split overrides."""

    name: str
    seeds: int
    splits: tuple[str, ...]
    methods: tuple[str, ...]
    rounds: int
    target_accuracy: float
    settings: Mapping[str, Any]
    """Run-config keys shared by every run (besides rounds and stage lengths, see :func:`stage_rounds`)."""


_COMMON = {
    "rank-max": 8,
    "rank-min": 2,
    # Every client trains every round. The app samples nodes by their node id, which Flower's simulation
    # draws at random per run, so with fraction-train < 1 two runs with the same seed would train different
    # partitions in the same round: methods would not see the same clients.
    "fraction-train": 1.0,
    "min-nodes": 7,
    "batch-size": 16,
    "local-epochs": 1,
    # 4x the app's defaults (2e-3, 5e-5): at the defaults, 3 local steps x 8 rounds did not move any method
    # off the majority class (39.3%); at these, fedit-rmax reached 58-61% and fedavg 66% (bench/README.md).
    "lr": 8e-3,
    "full-lr": 2e-4,
    "eval-batch-size": 100,
}
PRESETS = {
    # All 7 clients per round (four waves on 2 cores), 48 samples (3 steps) each: ~73 min on 2 cores
    # (bench/README.md).
    "full": Preset(
        name="full", seeds=3, splits=("natural", "dirichlet"), methods=tuple(METHODS), rounds=8,
        target_accuracy=0.55,
        settings={**_COMMON, "local-samples": 48, "test-size": 300},
    ),
    # A smoke of the whole pipeline: every method, one split, one seed, 3 rounds, tiny data, 2 clients per
    # round (with all 7 the first round's model loads and 4 waves took it to 10.4 min on a busy machine); ~5 min.
    "quick": Preset(
        name="quick", seeds=1, splits=("natural",), methods=tuple(METHODS), rounds=3,
        target_accuracy=0.45,
        settings={**_COMMON, "fraction-train": 0.01, "min-nodes": 2, "local-samples": 16, "test-size": 100},
    ),
}

#: Seconds per unit on this 2-core machine, measured with other work running (bench/README.md); only for
#: the ETA and --dry-run's estimate.
COSTS = {
    "startup": 25.0,             # one `flwr run`: ServerApp + simulation start, model and data loads
    "first-round": 8.0,          # the first client round: actors load the model and tokenize partitions
    "eval-per-row": 0.014,       # central evaluation, every round and round 0
    "lora-per-sample": 0.038,    # one client, one LoRA training sample (incl. per-client overhead)
    "full-per-sample": 0.068,    # one client, one full fine-tuning sample
    "full-transfer": 0.5,        # per client and full round: ~91 MB down + ~91 MB up through the SuperLink
    "parallel-clients": 2,       # clients trained at once (2 cores, client-resources-num-cpus=1)
}


class CompareError(ValueError):
    """A bad command-line value; the message names the value and what is allowed."""


# --- Planning (pure) -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One planned run: a split, a method, a seed and a learning-rate multiplier.

    Attributes
    ----------
    split, method : str
        Keys of ``SPLITS`` and ``METHODS``.
    seed : int
        Run seed (partitions, client sampling, initialisation).
    lr_multiplier : float
        Multiplier of ``lr`` (LoRA methods) or ``full-lr`` (full fine-tuning methods).
    settings : dict
        The complete run-config (kebab-case keys) except ``out-dir`` and ``run-name``.
    num_supernodes : int
        Simulated nodes (``--federation-config num-supernodes=N``).
    """

    split: str
    method: str
    seed: int
    lr_multiplier: float
    settings: Mapping[str, Any] = field(hash=False)
    num_supernodes: int = 7

    @property
    def run_name(self) -> str:
        """``<method>-s<seed>``, or ``<method>-lrx<m>-s<seed>`` at another lr multiplier."""
        lr = "" if self.lr_multiplier == 1.0 else f"-lrx{self.lr_multiplier:g}"
        return f"{self.method}{lr}-s{self.seed}"

    @property
    def key(self) -> str:
        """``<split>/<run-name>`` (unique within a comparison)."""
        return f"{self.split}/{self.run_name}"

    @property
    def federation(self) -> str:
        """The ``--federation-config`` string."""
        return FEDERATION.format(n=self.num_supernodes)

    @property
    def lr_key(self) -> str:
        """The run-config key the lr multiplier scales."""
        return lr_key(self.method)


def lr_key(method: str) -> str:
    """``full-lr`` for full fine-tuning methods, ``lr`` for LoRA methods."""
    return "full-lr" if method in FULL_METHODS else "lr"


def parse_choices(text: str, allowed: Sequence[str], option: str) -> tuple[str, ...]:
    """Split a comma-separated option value and check every item.

    Parameters
    ----------
    text : str
        E.g. ``"fedit-rmax,sa-fedlora"``.
    allowed : sequence of str
        The allowed items.
    option : str
        The option's name, for the error message.

    Returns
    -------
    tuple of str
        The items in the given order, duplicates dropped.

    Raises
    ------
    CompareError
        On an empty list or an unknown item (the message names it and lists what is allowed).
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise CompareError(f"{option} = {text!r} is not allowed; give a comma-separated list of: {', '.join(allowed)}")
    for item in items:
        if item not in allowed:
            raise CompareError(f"{option}: {item!r} is not allowed; choose from: {', '.join(allowed)}")
    return tuple(dict.fromkeys(items))


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["test-size=800", "schedule=linear"]`` -> ``{"test-size": 800, "schedule": "linear"}``.

    Values are read as TOML (numbers, booleans, quoted strings); anything else is a plain string.

    Raises
    ------
    CompareError
        On an item without ``=`` or a key that is not a run-config key.
    """
    from .config import RunConfig

    known = set(RunConfig().to_dict())
    fixed = {"out-dir", "run-name", "seed", "num-server-rounds", "method"}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CompareError(f"--set {item!r} is not allowed; write KEY=VALUE, e.g. --set test-size=800")
        if key not in known:
            raise CompareError(f"--set: {key!r} is not a run-config key; known keys: {', '.join(sorted(known))}")
        if key in fixed:
            raise CompareError(f"--set: {key!r} is set by the comparison itself (use --rounds, --seeds, --methods, "
                               "--out/--name); choose another key")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out[key] = value
    return out


def stage_rounds(rounds: int) -> dict[str, int]:
    """sa-fedlora's stage lengths for ``rounds`` rounds: 1 initiating round, then shrink, then cool.

    The initiating round already runs at the top budget, so there is no separate heating round, and the
    second half of the annealing rounds (rounded up) cools at the bottom budget. This is what the byte goal
    asks for: the mean budget over the run must stay under half of rank-max's to send at most 50% of
    fedit-at-rank-max's bytes (8 rounds: budgets 96, 96, 45, 27, 24, 24, 24, 24 = 47% of 8 x 96).

    Examples: 8 -> init 1, heat 0, cool 4 (the budget shrinks over 3 rounds); 3 -> init 1, heat 0,
    cool 1; 2 -> init 1, heat 0, cool 1; 1 -> init 0, heat 0, cool 1.
    """
    init = 1 if rounds >= 2 else 0
    annealing = rounds - init
    return {"init-rounds": init, "heat-rounds": 0, "cool-rounds": math.ceil(annealing / 2)}


def seeds_for(method: str, seeds: Sequence[int]) -> list[int]:
    """Every seed for a headline method, the first seed only for the others."""
    return list(seeds) if method in HEADLINE else list(seeds[:1])


def run_settings(base: Mapping[str, Any], split: str, method: str, seed: int, lr_multiplier: float = 1.0
                 ) -> dict[str, Any]:
    """The full run-config of one run: base settings, then the split's, then the method's overrides.

    Parameters
    ----------
    base : mapping
        Shared settings, including ``num-server-rounds``, stage lengths, ``lr`` and ``full-lr``.
    split, method : str
        Keys of ``SPLITS`` and ``METHODS``.
    seed : int
        The run seed.
    lr_multiplier : float
        Scales ``lr`` (LoRA methods) or ``full-lr`` (full methods).
    """
    settings = {**base, **SPLITS[split][0], "seed": seed}
    for key, value in METHODS[method].items():
        settings[key] = settings[value[1:-1]] if isinstance(value, str) and value.startswith("{") else value
    key = lr_key(method)
    settings[key] = float(f"{settings[key] * lr_multiplier:.6g}")
    return settings


def plan_runs(base: Mapping[str, Any], methods: Sequence[str], splits: Sequence[str], seeds: Sequence[int],
              lr_multipliers: Mapping[str, float] | None = None) -> list[RunSpec]:
    """The comparison's runs, split by split, headline methods over every seed, the rest on the first.

    Parameters
    ----------
    base : mapping
        Shared settings (see :func:`run_settings`).
    methods, splits : sequence of str
        Keys of ``METHODS`` and ``SPLITS``.
    seeds : sequence of int
        Seeds; the first one is used by every method.
    lr_multipliers : mapping, optional
        ``{method: multiplier}`` chosen by the lr search (default 1 for every method).

    Returns
    -------
    list of RunSpec
        Ordered split, then seed, then method (so one seed's whole comparison finishes first).
    """
    lr_multipliers = lr_multipliers or {}
    plan = []
    for split in splits:
        for seed in seeds:
            for method in methods:
                if seed in seeds_for(method, seeds):
                    m = float(lr_multipliers.get(method, 1.0))
                    plan.append(RunSpec(split, method, seed, m, run_settings(base, split, method, seed, m),
                                        SPLITS[split][1]))
    return plan


def plan_lr_search(base: Mapping[str, Any], methods: Sequence[str], split: str, seed: int,
                   grid: Sequence[float] = LR_GRID) -> list[RunSpec]:
    """Every method at every lr multiplier of ``grid``, on one split and one seed."""
    return [RunSpec(split, method, seed, float(m), run_settings(base, split, method, seed, float(m)), SPLITS[split][1])
            for method in methods for m in grid]


def choose_lr(final_accuracy: Mapping[float, float | None]) -> float:
    """The multiplier with the best final accuracy; ties go to the one closest to 1 (then the smaller).

    Parameters
    ----------
    final_accuracy : mapping
        ``{multiplier: final accuracy}``; ``None`` for a run that failed.

    Raises
    ------
    ValueError
        When no run has an accuracy.
    """
    scored = [(acc, m) for m, acc in final_accuracy.items() if acc is not None]
    if not scored:
        raise ValueError("no finished lr-search run to choose from")
    return max(scored, key=lambda am: (am[0], -abs(math.log(am[1])), -am[1]))[1]


def format_value(value: Any) -> str:
    """A run-config value as ``flwr run --run-config`` reads it (TOML): strings quoted, numbers plain."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if "'" in value or "\n" in value:
            raise CompareError(f"run-config value {value!r} is not allowed; it must not hold a quote or a newline")
        return f"'{value}'"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def run_config_string(settings: Mapping[str, Any]) -> str:
    """``key=value key='text' ...`` for ``--run-config``."""
    return " ".join(f"{key}={format_value(value)}" for key, value in settings.items())


def clients_per_round(settings: Mapping[str, Any], num_supernodes: int) -> int:
    """Nodes sampled per round, as the strategy samples them."""
    fraction = float(settings.get("fraction-train", 1.0))
    min_nodes = int(settings.get("min-nodes", 2))
    return min(num_supernodes, max(int(num_supernodes * fraction), min_nodes))


def estimate_seconds(spec: RunSpec, costs: Mapping[str, float] = COSTS) -> float:
    """Rough wall time of one run on 2 cores (for the ETA and the dry run).

    ``startup + first-round + (T + 1) evaluations + sum over rounds of waves x per-client time``,
    with ``ceil(clients / parallel-clients)`` waves per round; full rounds also pay the transfer
    of the whole model to and from every client.
    """
    s = spec.settings
    rounds = int(s["num-server-rounds"])
    if spec.method in FULL_METHODS:
        full_rounds = rounds
    elif s.get("init-trainable", "lora") == "full" and METHODS[spec.method]["method"] == "sa-fedlora":
        full_rounds = int(s.get("init-rounds", 0))
    else:
        full_rounds = 0
    clients = clients_per_round(s, spec.num_supernodes)
    waves = math.ceil(clients / costs["parallel-clients"])
    samples = int(s["local-samples"]) * int(s.get("local-epochs", 1))
    lora_round = waves * samples * costs["lora-per-sample"]
    full_round = waves * samples * costs["full-per-sample"] + clients * costs["full-transfer"]
    evaluation = (rounds + 1) * int(s["test-size"]) * costs["eval-per-row"]
    return (costs["startup"] + costs["first-round"] + evaluation + full_rounds * full_round
            + (rounds - full_rounds) * lora_round)


# --- Aggregation (pure) ----------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is ``None`` for fewer than two values.

    Examples
    --------
    >>> mean_std([0.5, 0.6, 0.7])
    (0.6, 0.1)
    """
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def rounds_to_target(records: Sequence[Mapping], target: float) -> int | None:
    """The first round (0 = the initial model) whose central accuracy is >= ``target``; ``None`` if never."""
    for record in records:
        accuracy = record.get("accuracy")
        if accuracy is not None and accuracy >= target:
            return int(record["round"])
    return None


def saving_pct(value: float | None, reference: float | None) -> float | None:
    """``100 * (1 - value / reference)``: positive when ``value`` sends less; ``None`` without a reference."""
    if value is None or not reference:
        return None
    return 100.0 * (1.0 - value / reference)


def run_totals(records: Sequence[Mapping]) -> dict[str, float]:
    """Sums over the rounds (round 0 sends nothing) and the headline numbers of one run's metrics.

    ``best-accuracy`` is the best over rounds 1..T (the initial model does not count);
    ``last3-accuracy`` the mean over the last three rounds (less sensitive to the last round's sample).
    """
    rounds = [r for r in records if r["round"] > 0]
    final = records[-1]
    return {
        "final-accuracy": final.get("accuracy"),
        "final-macro-f1": final.get("macro-f1"),
        "best-accuracy": max((r["accuracy"] for r in rounds if r.get("accuracy") is not None), default=None),
        "last3-accuracy": mean_std([r.get("accuracy") for r in rounds[-3:]])[0],
        "bytes-down": sum(r["bytes-down"] for r in rounds),
        "bytes-up": sum(r["bytes-up"] for r in rounds),
        "params-down": sum(r["params-down"] for r in rounds),
        "params-up": sum(r["params-up"] for r in rounds),
        "rounds": len(rounds),
        "dropped": sum(int(r.get("dropped") or 0) for r in rounds),
    }


def _number(value: float | None) -> float | int | None:
    """An integral float as int (byte counts that are the same for every seed stay exact)."""
    if value is not None and float(value).is_integer():
        return int(value)
    return value


def method_row(split: str, method: str, runs: Sequence[tuple[Mapping, Sequence[Mapping]]], target: float,
               lr: tuple[str, float, float], seeds_planned: int) -> dict[str, Any]:
    """One table row: a method on a split, aggregated over its seeds.

    Parameters
    ----------
    split, method : str
        The row's split and method.
    runs : sequence of (summary, records)
        Each finished seed's ``summary.json`` and ``metrics.jsonl`` records.
    target : float
        Accuracy for the rounds-to-target column.
    lr : (str, float, float)
        ``(lr key, value, multiplier)`` the runs used.
    seeds_planned : int
        Seeds the plan gave this method (a row with fewer finished runs says so).

    Returns
    -------
    dict
        Column -> value; accuracies as fractions, ``*_std`` ``None`` for a single seed. Savings are
        filled in by :func:`add_savings`.
    """
    totals = [run_totals(records) for _, records in runs]
    row: dict[str, Any] = {"split": split, "method": method, "seeds": len(runs), "seeds_planned": seeds_planned,
                           "lr_key": lr[0], "lr": lr[1], "lr_multiplier": lr[2]}
    for column, key in (("final_accuracy", "final-accuracy"), ("best_accuracy", "best-accuracy"),
                        ("last3_accuracy", "last3-accuracy"), ("final_macro_f1", "final-macro-f1")):
        row[f"{column}_mean"], row[f"{column}_std"] = mean_std([t[key] for t in totals])
    reached = [rounds_to_target(records, target) for _, records in runs]
    hits = [r for r in reached if r is not None]
    row["rounds_to_target"] = mean_std(hits)[0] if runs and len(hits) == len(runs) else None
    row["reached_target"] = f"{len(hits)}/{len(runs)}"
    for column, key in (("bytes_down", "bytes-down"), ("bytes_up", "bytes-up")):
        row[column] = _number(mean_std([t[key] for t in totals])[0])
    row["mb_down"] = row["bytes_down"] / MB if row["bytes_down"] is not None else None
    row["mb_up"] = row["bytes_up"] / MB if row["bytes_up"] is not None else None
    row["params_sent"] = _number(mean_std([t["params-down"] + t["params-up"] for t in totals])[0])
    row["saving_vs_fedavg_pct"] = row["saving_vs_fedit_rmax_pct"] = None
    row["wall_seconds"] = mean_std([s.get("wall-seconds") for s, _ in runs])[0]
    row["dropped_replies"] = sum(t["dropped"] for t in totals)
    return row


def add_savings(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``saving_vs_fedavg_pct`` and ``saving_vs_fedit_rmax_pct`` from the same split's reference rows.

    The saving compares total bytes (down + up): ``100 * (1 - bytes / bytes_reference)``.
    """
    totals = {(r["split"], r["method"]): (r["bytes_down"] + r["bytes_up"]) if r["bytes_down"] is not None else None
              for r in rows}
    out = []
    for row in rows:
        row = dict(row)
        mine = totals[(row["split"], row["method"])]
        for reference, column in zip(REFERENCES, ("saving_vs_fedavg_pct", "saving_vs_fedit_rmax_pct"), strict=True):
            row[column] = saving_pct(mine, totals.get((row["split"], reference)))
        out.append(row)
    return out


CSV_COLUMNS = ("split", "method", "seeds", "seeds_planned", "lr_key", "lr", "lr_multiplier",
               "final_accuracy_mean", "final_accuracy_std", "best_accuracy_mean", "best_accuracy_std",
               "last3_accuracy_mean", "last3_accuracy_std",
               "final_macro_f1_mean", "final_macro_f1_std", "rounds_to_target", "reached_target",
               "bytes_down", "bytes_up", "mb_down", "mb_up", "params_sent",
               "saving_vs_fedavg_pct", "saving_vs_fedit_rmax_pct", "wall_seconds", "dropped_replies")


def format_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV with ``CSV_COLUMNS`` (empty cells for missing values)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
    return buffer.getvalue()


def format_pm(mean: float | None, std: float | None, scale: float = 100.0, digits: int = 1) -> str:
    """``"58.3 ± 1.2"`` (``scale`` 100 turns fractions into percent); ``"58.3"`` without a std; ``""`` if none."""
    if mean is None:
        return ""
    text = f"{mean * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def format_saving(pct: float | None) -> str:
    """``"75.0%"``; a method that sends more than twice the reference also gets the factor: ``"-900% (10x)"``."""
    if pct is None:
        return ""
    if pct < -100.0:
        return f"{pct:.0f}% ({1 - pct / 100:.0f}x)"
    return f"{pct:.1f}%"


def format_rounds_to_target(mean: float | None, reached: str) -> str:
    """``"3"`` when every seed reached the target, ``"never"`` when none did, ``"2/3 reached"`` otherwise."""
    hits, _, runs = reached.partition("/")
    if runs in ("", "0"):
        return ""
    if hits == "0":
        return "never"
    if hits != runs:
        return f"{reached} reached"
    return f"{mean:.3g}"


def format_markdown(rows: Sequence[Mapping[str, Any]], target: float, notes: Sequence[str] = ()) -> str:
    """A Markdown table of the rows, one per split + method, with the notes below."""
    header = ("split", "method", "seeds", "lr", "final acc %", "best acc %", "last-3 acc %", "macro-F1",
              f"rounds to {target:.0%}", "MB down", "MB up", "params sent", "saving vs fedavg",
              "saving vs fedit-rmax", "wall s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        seeds = f"{r['seeds']}" + ("" if r["seeds"] == r["seeds_planned"] else f" of {r['seeds_planned']}")
        if r["seeds_planned"] == 1 and any(o["seeds_planned"] > 1 for o in rows):
            seeds += "*"
        rtt = format_rounds_to_target(r["rounds_to_target"], r["reached_target"])
        cells = (
            r["split"], r["method"], seeds, f"{r['lr_key']} {r['lr']:g} (x{r['lr_multiplier']:g})",
            format_pm(r["final_accuracy_mean"], r["final_accuracy_std"]),
            format_pm(r["best_accuracy_mean"], r["best_accuracy_std"]),
            format_pm(r["last3_accuracy_mean"], r["last3_accuracy_std"]),
            format_pm(r["final_macro_f1_mean"], r["final_macro_f1_std"], scale=1.0, digits=3),
            rtt,
            "" if r["mb_down"] is None else f"{r['mb_down']:.2f}",
            "" if r["mb_up"] is None else f"{r['mb_up']:.2f}",
            "" if r["params_sent"] is None else f"{r['params_sent'] / 1e6:.2f} M",
            format_saving(r["saving_vs_fedavg_pct"]),
            format_saving(r["saving_vs_fedit_rmax_pct"]),
            "" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}",
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines + [""] + [f"{note}  " for note in notes]) + "\n"


def config_mismatch(planned: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Keys whose value in a finished run's ``config.json`` (``given``) differs from the plan."""
    ignore = {"out-dir", "run-name", "cache-dir"}
    return [f"{k}: planned {v!r}, found {given.get(k)!r}" for k, v in planned.items()
            if k not in ignore and not _same(v, given.get(k))]


def _same(a: Any, b: Any) -> bool:
    """Equal, counting 8 and 8.0 as the same (TOML may give either)."""
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return float(a) == float(b) if numbers else a == b


# --- Reading run directories -------------------------------------------------------------------
def read_records(run_dir: Path) -> list[dict]:
    """The run's ``metrics.jsonl`` lines."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_summary(run_dir: Path) -> dict | None:
    """The run's ``summary.json``, or ``None`` if the run did not finish."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def packaged_with_app(root: Path, app_root: Path) -> bool:
    """Whether ``flwr run <app_root>`` would pack files under ``root`` into the app bundle (FAB).

    Flower packs every ``*.json``/``*.jsonl``/``*.md`` under the app directory that ``.gitignore``
    does not exclude, and refuses bundles over 10 MB or paths nested too deep: results written
    there would break every later run. Uses Flower's own filter.
    """
    from flwr.cli.utils import filter_paths_for_publish

    try:
        relative = root.resolve().relative_to(app_root.resolve())
    except ValueError:
        return False
    gitignore = app_root / ".gitignore"
    probe = (relative / "table.md").as_posix()
    files = {probe: b"", ".gitignore": gitignore.read_bytes() if gitignore.exists() else b""}
    try:
        return probe in filter_paths_for_publish(files)
    except Exception:  # e.g. the path is nested too deep for Flower: it would break runs too
        return True


def machine_info() -> dict[str, Any]:
    """Where the comparison ran."""
    import flwr
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu-count": os.cpu_count(),
            "torch": torch.__version__, "flwr": flwr.__version__, "hostname": platform.node()}


# --- Runner (thin) ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What happened to one planned run."""

    spec: RunSpec
    status: str  # "finished", "skipped" (finished earlier), "failed"
    seconds: float | None = None
    error: str = ""
    command: list[str] = field(default_factory=list)


class Comparison:
    """Runs planned :class:`RunSpec`s through ``flwr run`` into ``<root>/runs`` and reports progress.

    Parameters
    ----------
    root : Path
        ``<out>/<name>``.
    say : callable
        Prints one progress line.
    flower_factory : callable, optional
        ``home -> LocalFlower`` (tests may substitute it).
    """

    def __init__(self, root: Path, say: Callable[[str], None] = print, flower_factory=None):
        self.root = root
        self.say = say
        if flower_factory is None:
            from .simulation import LocalFlower
            flower_factory = LocalFlower
        self.flower_factory = flower_factory
        self._flower = None
        self._home: Path | None = None
        self.outcomes: dict[str, Outcome] = {}
        self._spent = self._estimated = 0.0  # over runs done in this invocation (ETA calibration)

    def run_dir(self, spec: RunSpec) -> Path:
        return self.root / "runs" / spec.split / spec.run_name

    def settings_with_output(self, spec: RunSpec) -> dict[str, Any]:
        return {**spec.settings, "out-dir": str(self.root / "runs" / spec.split), "run-name": spec.run_name,
                "cache-dir": str(self.root / "cache")}  # node caches stay with the comparison

    def command(self, spec: RunSpec) -> list[str]:
        """The ``flwr run`` command line of a run (as LocalFlower runs it)."""
        from .simulation import APP_ROOT, BIN

        return [str(BIN / "flwr"), "run", str(APP_ROOT), "--stream", "--run-config",
                run_config_string(self.settings_with_output(spec)), "--federation-config", spec.federation]

    def finished(self, spec: RunSpec) -> bool:
        """Whether the run finished earlier (and was made with the same settings)."""
        run_dir = self.run_dir(spec)
        if not (run_dir / "summary.json").exists():
            return False
        config = run_dir / "config.json"
        given = json.loads(config.read_text()).get("given", {}) if config.exists() else {}
        problems = config_mismatch(spec.settings, given) if given else []
        if problems:
            raise CompareError(f"{run_dir} was made with other settings ({'; '.join(problems[:4])}); "
                               "choose another --name (or --out) for these settings")
        return True

    def run_all(self, plan: Sequence[RunSpec], phase: str = "", later: float = 0.0) -> list[Outcome]:
        """Run (or skip) every planned run in order, one progress line each, with an ETA.

        ``later`` is the estimate (seconds) of the runs of later phases, included in the ETA.
        """
        todo = [s for s in plan if not self.finished(s)]
        remaining = sum(estimate_seconds(s) for s in todo) + later
        label = f"{phase}: " if phase else ""
        self.say(f"{label}{len(plan)} runs, {len(plan) - len(todo)} finished earlier, {len(todo)} to run "
                 f"(estimate {(remaining - later) / 60:.0f} min on 2 cores)")
        outcomes = []
        for index, spec in enumerate(plan, 1):
            tag = f"[{index}/{len(plan)}] {spec.key}"
            if spec not in todo:
                outcome = Outcome(spec, "skipped", command=self.command(spec))
                self.say(f"{tag}: finished earlier | {self.describe(spec)}")
            else:
                estimate = estimate_seconds(spec)
                self.say(f"{tag}: started ({spec.lr_key} {spec.settings[spec.lr_key]:g}, "
                         f"{spec.settings['num-server-rounds']} rounds, ~{estimate:.0f} s)")
                outcome = self.run_one(spec, timeout=max(600.0, 6 * estimate))
                remaining -= estimate
                if outcome.status == "finished":
                    self._spent += outcome.seconds
                    self._estimated += estimate
                ratio = self._spent / self._estimated if self._estimated else 1.0
                eta = max(0.0, remaining * ratio)
                if outcome.status == "finished":
                    self.say(f"{tag}: finished in {outcome.seconds:.0f} s | {self.describe(spec)} | "
                             f"ETA {eta / 60:.1f} min")
                else:
                    self.say(f"{tag}: FAILED after {outcome.seconds:.0f} s: {outcome.error} | "
                             f"ETA {eta / 60:.1f} min")
            self.outcomes[spec.key] = outcome
            outcomes.append(outcome)
        return outcomes

    def describe(self, spec: RunSpec) -> str:
        """``acc 58.3% (best 59.0%) | 7.19 MB`` of a finished run."""
        records = read_records(self.run_dir(spec))
        t = run_totals(records)
        best = "" if t["best-accuracy"] is None else f" (best {t['best-accuracy']:.1%})"
        dropped = f" | WARNING: {t['dropped']} client replies dropped (see the log)" if t["dropped"] else ""
        return f"acc {t['final-accuracy']:.1%}{best} | {(t['bytes-down'] + t['bytes-up']) / MB:.2f} MB{dropped}"

    def run_one(self, spec: RunSpec, timeout: float) -> Outcome:
        """One ``flwr run``; a half-finished directory is moved to ``aborted/`` first."""
        run_dir = self.run_dir(spec)
        if run_dir.exists():
            aside = self.root / "aborted" / spec.split / f"{spec.run_name}-{datetime.now():%Y%m%d-%H%M%S}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(run_dir), str(aside))
            self.say(f"  moved the unfinished {run_dir.name} to {aside.relative_to(self.root)}")
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = self.root / "logs" / spec.split / f"{spec.run_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        flower = self._ensure_flower()
        start = time.perf_counter()
        command = self.command(spec)
        try:
            result = flower.run(run_config_string(self.settings_with_output(spec)), timeout=timeout,
                                federation=spec.federation)
            output = result.stdout + result.stderr
        except subprocess.TimeoutExpired as error:
            output = _text(error.stdout) + _text(error.stderr)
            log.write_text(output)
            self._restart_flower()  # the ServerApp may still be running: stop that SuperLink
            return Outcome(spec, "failed", time.perf_counter() - start, f"timed out after {timeout:.0f} s; log {log}",
                           command)
        log.write_text(output)
        try:
            status = flower.run_status(output)
        except (AssertionError, json.JSONDecodeError, KeyError, IndexError, subprocess.SubprocessError) as error:
            status = f"unknown ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        seconds = time.perf_counter() - start
        if status != "finished:completed" or read_summary(run_dir) is None:
            return Outcome(spec, "failed", seconds, f"status {status}; log {log}", command)
        return Outcome(spec, "finished", seconds, "", command)

    def _ensure_flower(self):
        if self._flower is None:
            self._home = Path(tempfile.mkdtemp(prefix="safedlora-compare-flwr-"))
            self._flower = self.flower_factory(self._home)
        return self._flower

    def _restart_flower(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop the SuperLink this comparison started and remove its Flower home."""
        if self._flower is not None:
            self._flower.stop()
            self._flower = None
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# --- Reporting ---------------------------------------------------------------------------------------
def build_rows(root: Path, plan: Sequence[RunSpec], target: float) -> list[dict[str, Any]]:
    """Aggregate the finished runs of ``plan`` into table rows (split, then method order of the plan)."""
    groups: dict[tuple[str, str], list[RunSpec]] = {}
    for spec in plan:
        groups.setdefault((spec.split, spec.method), []).append(spec)
    rows = []
    for (split, method), specs in groups.items():
        runs = []
        for spec in specs:
            run_dir = root / "runs" / spec.split / spec.run_name
            summary = read_summary(run_dir)
            if summary is not None:
                runs.append((summary, read_records(run_dir)))
        first = specs[0]
        lr = (first.lr_key, first.settings[first.lr_key], first.lr_multiplier)
        rows.append(method_row(split, method, runs, target, lr, len(specs)))
    return add_savings(rows)


def write_plots(root: Path, plan: Sequence[RunSpec]) -> list[Path]:
    """Per split: all methods' first seed on one chart (accuracy vs round / vs MB, budget), sa-fedlora's ranks."""
    from .plots import plot_ranks, plot_runs

    paths = []
    for split in dict.fromkeys(s.split for s in plan):
        runs: dict[str, list[dict]] = {}
        for spec in plan:
            run_dir = root / "runs" / split / spec.run_name
            if spec.split == split and spec.method not in runs and read_summary(run_dir) is not None:
                runs[spec.method] = read_records(run_dir)
        if not runs:
            continue
        out = root / "plots" / split
        paths += plot_runs(runs, out)
        if "sa-fedlora" in runs:
            ranks = plot_ranks(runs["sa-fedlora"], out / "sa-fedlora_ranks_vs_round.png")
            paths += [ranks] if ranks else []
    return paths


def table_notes(options: Mapping[str, Any], seeds: Sequence[int]) -> list[str]:
    """The lines under the Markdown table."""
    s = options["settings"]
    nodes = ", ".join(f"{split} {clients_per_round(s, SPLITS[split][1])} of {SPLITS[split][1]}"
                      for split in options["splits"])
    notes = [
        f"Same for every method: seeds {', '.join(map(str, seeds))}; {s['num-server-rounds']} rounds; clients per "
        f"round: {nodes}; {s['local-samples']} samples x {s['local-epochs']} epoch(s) per client and round; "
        f"central evaluation on {s['test-size']} held-out tweets; rank-max {s['rank-max']}, rank-min {s['rank-min']}.",
        "Accuracy: mean ± sample std over seeds where several; best = best round in 1..T; last-3 = mean of "
        "the last 3 rounds; macro-F1 of the final round. "
        "Bytes: all ArrayRecords sent down and up, all clients, all rounds (mean over seeds). "
        "Saving = 1 - bytes / bytes of the reference on the same split.",
        "wall s = the ServerApp's time from round 0's evaluation to the end (summary.json), without `flwr run` "
        "startup. Plots show each method's first seed.",
    ]
    if len(seeds) > 1:
        notes.append(f"* first seed ({seeds[0]}) only; seeds x{len(seeds)} for {', '.join(HEADLINE)}.")
    return notes


# --- Command line ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safedlora", description="SA-FedLoRA tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "compare", help="run every method on the same seeds, partitions and evaluation; write tables and plots",
        description="Run fedavg, fedprox, fedit (rank-max and rank-min), sa-fedlora and its ablations on the "
                    "same seeds, partitions, rounds, clients and evaluation, through `flwr run`, and write "
                    "<out>/<name>/{runs,plots,table.csv,table.md,comparison.json}. Finished runs are skipped "
                    "when the command is run again.")
    p.add_argument("--quick", action="store_true",
                   help="smoke preset (one split, one seed, 3 rounds, tiny data; < 10 min on 2 cores) "
                        "instead of the full preset (< 90 min on 2 cores)")
    p.add_argument("--name", default=None, help="results sub-directory (default: the preset's name)")
    p.add_argument("--out", default="results",
                   help="results directory, relative to the current directory or absolute (default: results)")
    p.add_argument("--seeds", type=str, default=None, help="seeds for the headline methods (>= 1; first seed is "
                   f"{FIRST_SEED}, then {FIRST_SEED + 1}, ...); default: preset")
    p.add_argument("--methods", default=None, help=f"comma-separated, from: {', '.join(METHODS)}; default: all")
    p.add_argument("--splits", default=None, help=f"comma-separated, from: {', '.join(SPLITS)}; default: preset")
    p.add_argument("--rounds", type=str, default=None, help="num-server-rounds (>= 1); default: preset")
    p.add_argument("--lr-search", action="store_true",
                   help=f"first try lr multipliers {', '.join(f'x{m:g}' for m in LR_GRID)} for every method on the "
                        "first seed and split, then use each method's best")
    p.add_argument("--target-accuracy", type=str, default=None,
                   help="accuracy (fraction in (0, 1]) for the rounds-to-target column; default: preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config value for every run, over the preset's (repeatable), e.g. --set test-size=1000")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and their run-config; run nothing")
    return parser


def _int_option(text: str | None, option: str, low: int) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise CompareError(f"{option} = {text!r} is not allowed; it must be an integer >= {low}") from None
    if value < low:
        raise CompareError(f"{option} = {value} is not allowed; it must be an integer >= {low}")
    return value


def resolve_options(args: argparse.Namespace, cwd: Path | None = None) -> dict[str, Any]:
    """Turn parsed arguments into the comparison's options; every bad value raises ``CompareError``.

    Returns
    -------
    dict
        ``preset``, ``root`` (``<out>/<name>``, absolute), ``seeds``, ``splits``, ``methods``,
        ``target``, ``lr_search``, ``settings`` (the shared run-config) and ``dry_run``.
    """
    from .config import ConfigError, RunConfig

    preset = PRESETS["quick" if args.quick else "full"]
    name = args.name if args.name is not None else preset.name
    if not name or "/" in name or name in (".", "..") or name.startswith("-"):
        raise CompareError(f"--name = {name!r} is not allowed; it must be a plain directory name, e.g. 'full'")
    out = Path(os.path.expanduser(args.out))
    root = (out if out.is_absolute() else (cwd or Path.cwd()) / out).resolve() / name
    n_seeds = _int_option(args.seeds, "--seeds", 1) or preset.seeds
    rounds = _int_option(args.rounds, "--rounds", 1) or preset.rounds
    methods = parse_choices(args.methods, tuple(METHODS), "--methods") if args.methods else preset.methods
    splits = parse_choices(args.splits, tuple(SPLITS), "--splits") if args.splits else preset.splits
    target = preset.target_accuracy
    if args.target_accuracy is not None:
        try:
            target = float(args.target_accuracy)
        except ValueError:
            target = float("nan")
        if not 0.0 < target <= 1.0:
            raise CompareError(f"--target-accuracy = {args.target_accuracy!r} is not allowed; it must be a fraction "
                               "in (0, 1], e.g. 0.55")
    from .simulation import APP_ROOT

    if packaged_with_app(root, APP_ROOT):
        raise CompareError(
            f"--out/--name = {root} is not allowed: it lies inside the app directory {APP_ROOT} and is not "
            "excluded by its .gitignore, so `flwr run` would pack the results (*.json, *.md) into the app "
            "bundle (10 MB limit). Use an --out outside the app directory, or add the folder (e.g. '/results/') "
            "to .gitignore")
    defaults = RunConfig()
    settings = {"lr": defaults.lr, "full-lr": defaults.full_lr, **preset.settings, "num-server-rounds": rounds,
                **stage_rounds(rounds), **parse_set(args.set)}
    seeds = [FIRST_SEED + i for i in range(n_seeds)]
    options = {"preset": preset.name, "root": root, "seeds": seeds, "splits": splits, "methods": methods,
               "target": target, "lr_search": bool(args.lr_search), "settings": settings, "dry_run": args.dry_run}
    # Every planned run-config must pass the app's own validation before anything starts.
    for spec in plan_runs(settings, methods, splits, seeds) + (
            plan_lr_search(settings, methods, splits[0], seeds[0]) if args.lr_search else []):
        try:
            RunConfig.from_mapping({**spec.settings, "out-dir": str(root), "run-name": spec.run_name})
        except ConfigError as error:
            raise CompareError(f"run {spec.key}: {error}") from None
    return options


def print_plan(options: Mapping[str, Any], say: Callable[[str], None] = print) -> None:
    """The dry run: every planned run with its run-config string and federation config."""
    settings, methods, splits, seeds = (options[k] for k in ("settings", "methods", "splits", "seeds"))
    runs = []
    if options["lr_search"]:
        search = plan_lr_search(settings, methods, splits[0], seeds[0])
        say(f"lr search ({len(search)} runs on {splits[0]}, seed {seeds[0]}):")
        runs += search
        for spec in search:
            say(f"  {spec.key}  --run-config \"{run_config_string(spec.settings)}\"  "
                f"--federation-config \"{spec.federation}\"")
        say("comparison (shown at x1; each method then uses the multiplier its search picks; runs that the "
            "search already made are not repeated):")
    plan = plan_runs(settings, methods, splits, seeds)
    runs += [s for s in plan if s.key not in {r.key for r in runs}]
    for spec in plan:
        say(f"  {spec.key}  --run-config \"{run_config_string(spec.settings)}\"  "
            f"--federation-config \"{spec.federation}\"")
    total = sum(estimate_seconds(s) for s in runs)
    say(f"{len(runs)} runs; estimate {total / 60:.0f} min on 2 cores; results in {options['root']}")


def lr_choices(root: Path, search: Sequence[RunSpec]) -> dict[str, dict[str, Any]]:
    """``{method: {"multiplier", "lr-key", "lr", "search": {multiplier: final accuracy}}}`` from finished runs."""
    by_method: dict[str, dict[float, float | None]] = {}
    values: dict[tuple[str, float], float] = {}
    for spec in search:
        summary = read_summary(root / "runs" / spec.split / spec.run_name)
        by_method.setdefault(spec.method, {})[spec.lr_multiplier] = summary["final-accuracy"] if summary else None
        values[(spec.method, spec.lr_multiplier)] = spec.settings[spec.lr_key]
    out = {}
    for method, accs in by_method.items():
        try:
            m = choose_lr(accs)
        except ValueError:
            m = 1.0
        out[method] = {"multiplier": m, "lr-key": lr_key(method), "lr": values[(method, m)],
                       "search": {f"x{k:g}": v for k, v in accs.items()}}
    return out


def compare(options: Mapping[str, Any], argv: Sequence[str], say: Callable[[str], None] = print,
            flower_factory=None) -> int:
    """Run the comparison described by ``options``; return the exit code (1 if a run failed)."""
    root: Path = options["root"]
    settings, methods, splits, seeds = (options[k] for k in ("settings", "methods", "splits", "seeds"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runner = Comparison(root, say=say, flower_factory=flower_factory)
    chosen: dict[str, dict[str, Any]] = {}
    search: list[RunSpec] = []
    try:
        if options["lr_search"]:
            search = plan_lr_search(settings, methods, splits[0], seeds[0])
            searched = {s.key for s in search}
            later = sum(estimate_seconds(s) for s in plan_runs(settings, methods, splits, seeds)
                        if s.key not in searched and not runner.finished(s))
            runner.run_all(search, phase="lr search", later=later)
            chosen = lr_choices(root, search)
            say("lr search picked: " + ", ".join(f"{m} {c['lr-key']} {c['lr']:g} (x{c['multiplier']:g})"
                                                 for m, c in chosen.items()))
        plan = plan_runs(settings, methods, splits, seeds, {m: c["multiplier"] for m, c in chosen.items()})
        runner.run_all(plan, phase="comparison")
    finally:
        runner.close()
    rows = build_rows(root, plan, options["target"])
    notes = table_notes(options, seeds)
    dropped = [f"{r['split']}/{r['method']} ({r['dropped_replies']})" for r in rows if r["dropped_replies"]]
    if dropped:
        notes.append("WARNING: client replies were dropped (failed or invalid) in: " + ", ".join(dropped)
                     + "; those rounds aggregated fewer clients (see logs/).")
    if chosen:
        notes.append("lr search (first seed, split " + splits[0] + "): " + "; ".join(
            f"{m} " + ", ".join(f"{k} {'' if v is None else f'{v:.1%}'}" for k, v in c["search"].items())
            + f" -> x{c['multiplier']:g}" for m, c in chosen.items()))
    (root / "table.csv").write_text(format_csv(rows))
    markdown = format_markdown(rows, options["target"], notes)
    (root / "table.md").write_text(markdown)
    plots = write_plots(root, plan)
    failed = [o for o in runner.outcomes.values() if o.status == "failed"]
    comparison = {
        "name": root.name,
        "created": datetime.now().isoformat(timespec="seconds"),
        "command": ["safedlora", *argv],
        "preset": options["preset"],
        "settings": {"shared-run-config": dict(settings), "methods": {m: METHODS[m] for m in methods},
                     "method-descriptions": {m: METHOD_DESCRIPTIONS[m] for m in methods},
                     "splits": {s: {"run-config": SPLITS[s][0], "num-supernodes": SPLITS[s][1]} for s in splits},
                     "seeds": seeds, "headline-methods": [m for m in HEADLINE if m in methods],
                     "target-accuracy": options["target"], "lr-search": options["lr_search"],
                     "lr-grid": list(LR_GRID) if options["lr_search"] else [],
                     "federation-config": FEDERATION},
        "chosen-lrs": chosen or {m: {"multiplier": 1.0, "lr-key": lr_key(m), "lr": settings[lr_key(m)],
                                     "search": {}} for m in methods},
        "machine": machine_info(),
        "wall-seconds": time.perf_counter() - started,
        "runs": [{"key": o.spec.key, "split": o.spec.split, "method": o.spec.method, "seed": o.spec.seed,
                  "lr-multiplier": o.spec.lr_multiplier, "status": o.status, "seconds": o.seconds,
                  "estimate-seconds": estimate_seconds(o.spec), "error": o.error,
                  "run-dir": str(root / "runs" / o.spec.split / o.spec.run_name),
                  "run-config": run_config_string(runner.settings_with_output(o.spec)),
                  "federation-config": o.spec.federation, "command": o.command}
                 for o in runner.outcomes.values()],
        "rows": rows,
        "plots": [str(p.relative_to(root)) for p in plots],
    }
    (root / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    say("")
    say(markdown)
    say(f"results in {root} ({(time.perf_counter() - started) / 60:.1f} min)")
    if failed:
        say(f"{len(failed)} run(s) failed: " + ", ".join(o.spec.key for o in failed) + "; run the same command "
            "again to redo them (finished runs are skipped)")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``safedlora`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = resolve_options(args)
    except CompareError as error:
        parser.exit(2, f"safedlora compare: error: {error}\n")
    say = lambda line: print(line, flush=True)  # noqa: E731
    if options["dry_run"]:
        print_plan(options, say)
        return 0
    try:
        return compare(options, argv, say)
    except CompareError as error:
        parser.exit(2, f"safedlora compare: error: {error}\n")
    except KeyboardInterrupt:
        say("interrupted; run the same command again to resume (finished runs are skipped)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
