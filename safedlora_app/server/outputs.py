"""Run outputs under ``out-dir/<run-name>/``: config, per-round metrics, summary, model, plots.

``metrics.jsonl`` gets one line per round as soon as the round ends (flushed and fsynced), so a
crash loses at most the round in flight. The strategy fills each round's :class:`RoundStats` in a
:class:`RoundLog`; the ServerApp's :class:`RunRecorder` (a ``RoundLog``) adds the central evaluation
and writes the line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.supercore import log

from safedlora_app.core.config import RunConfig
from safedlora_app.core.files import atomic_write_json, atomic_write_text, sync_file
from safedlora_app.core.run_folder import METRICS_FILE, RunFolder

MB = 1e6
#: Central evaluation's keys in a metrics.jsonl line: the test set's, and the validation set's (``val-``).
EVALUATION_KEYS = ("accuracy", "macro-f1", "loss", "perplexity", "eval-seconds", "val-accuracy", "val-macro-f1",
                   "val-loss", "val-perplexity")


@dataclass
class RoundStats:
    """What one round sent and received (one ``metrics.jsonl`` line, with the round's evaluation)."""

    round: int
    stage: str
    kind: str
    budget: int | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    """Ranks sent to the nodes in this round."""
    model_ranks: dict[str, int] = field(default_factory=dict)
    """Ranks of the model the round ended with, whose accuracy this line reports (empty where not evaluated)."""
    nodes: int = 0
    capped: int = 0
    """Nodes sent lower ranks than ``ranks`` because of their node-config ``max-rank``."""
    replies: int = 0
    dropped: int = 0
    trained: list[str] = field(default_factory=list)
    """The nodes whose replies the round aggregated, by name (node-config ``node-name``; ``partition-<id>`` in a
    simulation; else the node id): who a model's training rows came from (a membership check reads it)."""
    bytes_down: int = 0
    bytes_up: int = 0
    params_down: int = 0
    params_up: int = 0
    backbone_sends: int = 0
    revived: int = 0
    train_loss: float | None = None
    train_seconds: float | None = None
    """Seconds a node spent training (its optimizer steps); the nodes' mean weighted by their examples."""
    train_seconds_max: float | None = None
    """The slowest node's training seconds."""
    train_seconds_total: float | None = None
    """The nodes' training seconds summed."""
    client_seconds: float | None = None
    """Seconds a node's ClientApp spent on the round's message, training included (model set-up, reply); the
    nodes' mean weighted by their examples, like ``train_seconds``."""
    client_seconds_total: float | None = None
    """The nodes' ClientApp seconds summed: over ``exchange_seconds``, how many worked at once
    (:func:`nodes_at_once`)."""
    in_turn: bool | None = None
    """Whether the replying nodes' ClientApps worked one after the other (:func:`one_after_another`); ``None``
    with fewer than 2 replies that report their times."""
    exchange_seconds: float | None = None
    """Seconds from handing the round's messages to Flower to holding every reply (or the deadline)."""
    peak_memory_mb: float | None = None
    aggregate_seconds: float = 0.0
    first_step_a_ratio: float | None = None
    dropped_update: float | None = None
    """Share of the round's mean update (sum over modules, squared Frobenius) that truncation to rank-max dropped."""
    factor_norms: dict[str, float] = field(default_factory=dict)
    """``||B||_F`` and ``||A||_F`` of the first module's global factors after aggregation."""
    # Differential privacy (private runs only; docs/privacy.md).
    dp_epsilon: float | None = None
    """Epsilon spent after this round (the accountant's, at the run's delta)."""
    dp_norm: float | None = None
    """The replies' median update norm before clipping (compare with dp-clip)."""
    dp_clipped: float | None = None
    """Share of the replies that clipping scaled down."""
    # Federated evaluation (fraction-evaluate > 0): the round's global model on the nodes' held-out rows.
    eval_nodes: int = 0
    eval_replies: int = 0
    eval_dropped: int = 0
    eval_rows: int = 0
    eval_bytes_down: int = 0
    eval_bytes_up: int = 0
    fed_accuracy: float | None = None
    """Row-weighted mean of the evaluating nodes' accuracies (= accuracy over all their held-out rows)."""
    fed_macro_f1: float | None = None
    """Row-weighted mean of the nodes' own macro-F1s (not the macro-F1 of the pooled rows)."""
    fed_loss: float | None = None
    fed_perplexity: float | None = None
    """causal-lm: the perplexity of ``fed_loss`` (the nodes' row-weighted mean loss per response token)."""


ONE_AFTER_ANOTHER_HINT = (
    "round %d: the %d nodes trained one after the other (no two of their ClientApps worked at the same time). A "
    "simulation gives each node `client-resources-num-cpus` CPUs (Flower's default: 2), so that a machine with "
    "fewer than 2 CPUs per node runs them in turn; with one CPU per node they train at once: "
    "flwr run . --federation-config \"client-resources-num-cpus=1\" (docs/speed.md)")


def one_after_another(intervals: Sequence[tuple[float, float]]) -> bool | None:
    """Whether the nodes' ClientApps worked one after the other: no two of their ``(start, end)`` wall-clock
    intervals overlap. ``None`` with fewer than 2 intervals. Nodes that ran at once overlap for most of their
    rounds, however long their process start-up or however uneven their data, so no threshold is needed."""
    if len(intervals) < 2:
        return None
    ordered = sorted(intervals)
    return all(later[0] >= earlier[1] for earlier, later in zip(ordered, ordered[1:]))


def nodes_at_once(line: Mapping) -> float | None:
    """How many nodes' ClientApps worked at once in a round, on average: their summed seconds over the exchange's.
    About 1 when they ran one after the other, about the number of replies when all ran at once; ``None`` with
    fewer than 2 replies or without the times (round 0, lines of older runs)."""
    total, exchange = line.get("client-seconds-total"), line.get("exchange-seconds")
    if (line.get("replies") or 0) < 2 or not total or not exchange:
        return None
    return total / exchange


def selection_loss(line: Mapping) -> float | None:
    """The validation loss that ranks a round's model: the central validation set's (``val-size``), else the
    nodes' held-out rows' (federated evaluation). Never the test set's: a round chosen on it would make the
    test score a choice, not a measurement. ``None``: the round has no validation score."""
    loss = line.get("val-loss")
    return line.get("fed-loss") if loss is None else loss


@dataclass
class BestRound:
    """The evaluated round (1..T) with the lowest validation loss so far (:func:`selection_loss`).

    On small or skewed data the held-out loss can rise while the nodes' training loss falls (client drift),
    so the last round's model need not be the best one; the ServerApp keeps this round's model too.
    """

    round: int | None = None
    loss: float | None = None

    def offer(self, line: Mapping) -> bool:
        """Take ``line`` (a metrics.jsonl row) if its loss is lower than the best so far; ``True`` if taken."""
        loss = selection_loss(line)
        if line["round"] < 1 or loss is None or not math.isfinite(loss) or (self.loss is not None
                                                                              and loss >= self.loss):
            return False  # a diverged round (non-finite loss) never counts
        self.round, self.loss = line["round"], float(loss)
        return True

    @classmethod
    def of(cls, records: Sequence[Mapping]) -> BestRound:
        """The best round among ``records`` (a resumed run's rows)."""
        best = cls()
        for line in records:
            best.offer(line)
        return best


class RoundLog:
    """The rounds' :class:`RoundStats`, in order; the strategy starts and fills one per round."""

    def __init__(self) -> None:
        self.rounds: list[RoundStats] = []

    def start(self, stats: RoundStats) -> RoundStats:
        self.rounds.append(stats)
        return stats

    @property
    def current(self) -> RoundStats:
        return self.rounds[-1]

    def of_round(self, server_round: int) -> RoundStats | None:
        """The stats of ``server_round`` (``None`` for round 0, or a round that did not start)."""
        return next((s for s in reversed(self.rounds) if s.round == server_round), None)


def run_directory(config: RunConfig) -> Path:
    """Create and return the absolute run directory (refusing to mix two runs' metrics).

    With ``resume = true`` the directory must hold the run to continue.
    """
    name = config.run_name or f"{config.method}-{datetime.now():%Y%m%d-%H%M%S}"
    path = Path(os.path.expanduser(config.out_dir)).resolve() / name
    if config.resume:
        if not path.is_dir():
            raise FileNotFoundError(f"resume = true, but run-name = {name!r} has no directory {path}")
        return path
    if RunFolder(path).started:
        raise FileExistsError(f"run-name = {name!r}: {path} already holds a run; choose another run-name, "
                              "or set resume = true to continue it")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, data) -> None:
    """Write JSON atomically (see :func:`~safedlora_app.core.files.atomic_write`)."""
    atomic_write_json(path, data, indent=2)


def run_totals(records: Sequence[Mapping]) -> dict:
    """A run's totals and headline numbers from its ``metrics.jsonl`` lines (round 0 sends nothing).

    ``best-accuracy`` is the best over the evaluated rounds 1..T (the initial model does not count);
    ``last3-accuracy`` the mean over the last three rounds (less sensitive to the last round's sample);
    ``final-ranks`` the ranks of the model the run ended with. Bytes are training traffic; federated
    evaluation's are ``eval-mb``.
    """
    rows = [r for r in records if r["round"] > 0]
    final = records[-1] if records else {}
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    best = max(evaluated, key=lambda r: r["accuracy"], default={})
    selected = BestRound.of(records)  # the round whose model best-round-<t>/ keeps
    last3 = [r["accuracy"] for r in rows[-3:] if r.get("accuracy") is not None]
    down, up = sum(r["bytes-down"] for r in rows), sum(r["bytes-up"] for r in rows)
    return {
        "rounds": len(rows),
        "final-accuracy": final.get("accuracy"),
        "final-macro-f1": final.get("macro-f1"),
        "final-loss": final.get("loss"),
        "final-perplexity": final.get("perplexity"),
        "final-val-accuracy": final.get("val-accuracy"),
        "final-val-loss": final.get("val-loss"),
        # The test set's best round is an oracle (chosen on the test set); the selected round is chosen on
        # validation, and its test accuracy is a fair "early-stopped" score.
        "best-accuracy": best.get("accuracy"),
        "best-round": best.get("round"),
        "selected-round": selected.round,
        "selected-accuracy": next((r.get("accuracy") for r in rows if r["round"] == selected.round), None),
        "last3-accuracy": sum(last3) / len(last3) if last3 else None,
        "bytes-down": down,
        "bytes-up": up,
        "params-down": sum(r["params-down"] for r in rows),
        "params-up": sum(r["params-up"] for r in rows),
        "total-mb": (down + up) / MB,
        "dropped-replies": sum(int(r.get("dropped") or 0) for r in rows),
        "rounds-without-replies": sum(1 for r in rows if r.get("replies") == 0),
        "final-ranks": final.get("model-ranks") or {},
        "final-fed-accuracy": final.get("fed-accuracy"),
        "final-fed-macro-f1": final.get("fed-macro-f1"),
        "eval-mb": sum(r.get("eval-bytes-down", 0) + r.get("eval-bytes-up", 0) for r in rows) / MB,
        "final-epsilon": final.get("dp-epsilon"),
    }


def _scores(line: Mapping, prefix: str) -> str:
    """A metrics line's held-out scores in words (``prefix`` "fed-": the federated ones); "" where none."""
    if line.get(prefix + "accuracy") is not None:
        return f"acc {line[prefix + 'accuracy']:.1%} f1 {line[prefix + 'macro-f1']:.3f}"
    if line.get(prefix + "perplexity") is not None:
        return f"loss {line[prefix + 'loss']:.3f} perplexity {line[prefix + 'perplexity']:.2f}"
    if line.get(prefix + "loss") is not None:  # a task that reports its loss alone
        return f"loss {line[prefix + 'loss']:.4g}"
    return ""


class RunRecorder(RoundLog):
    """Writes each round's stats and central evaluation to metrics.jsonl, and the run's summary."""

    def __init__(self, run_dir: Path, num_rounds: int):
        super().__init__()
        self.path = run_dir / METRICS_FILE
        self.num_rounds = num_rounds
        self.records: list[dict] = []
        self._last = time.perf_counter()
        self._cum_down = self._cum_up = 0
        self._told_one_after_another = False

    def state_dict(self) -> dict[str, list[dict]]:
        """Every round's line so far (see :mod:`~safedlora_app.server.checkpoint`)."""
        return {"records": self.records}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after the checkpointed records: metrics.jsonl is rewritten to exactly those lines
        (dropping any line of a round that ended after the checkpoint) and the byte counts go on from them."""
        self.records = [dict(r) for r in state["records"]]
        last = self.records[-1] if self.records else {}
        self._cum_down, self._cum_up = last.get("cumulative-bytes-down", 0), last.get("cumulative-bytes-up", 0)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def record(self, server_round: int, evaluation: dict[str, float] | None,
               model_ranks: Mapping[str, int] | None = None) -> dict:
        """Append the line for ``server_round`` (round 0: the initial model, nothing sent).

        ``model_ranks``: the ranks of the model the round ended with (the evaluated one). A round
        without central evaluation (``eval-every``) has ``null`` accuracy, macro-F1, loss and eval-seconds.
        """
        now = time.perf_counter()
        # Round 0 (the initial model) has the same fields as every other line, all zero.
        stats = self.of_round(server_round) or RoundStats(round=server_round, stage="initial", kind="none")
        stats.model_ranks = dict(model_ranks or {})
        row = dataclasses.asdict(stats)
        self._cum_down += row["bytes_down"]
        self._cum_up += row["bytes_up"]
        line = {k.replace("_", "-"): v for k, v in row.items()}
        line.update({
            "cumulative-bytes-down": self._cum_down,
            "cumulative-bytes-up": self._cum_up,
            "cumulative-bytes": self._cum_down + self._cum_up,
            "cumulative-mb": (self._cum_down + self._cum_up) / MB,
            **dict.fromkeys(EVALUATION_KEYS), **(evaluation or {}),
            "round-seconds": now - self._last,
        })
        self._last = now
        with self.path.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
            sync_file(handle)
        self.records.append(line)
        log(INFO, "%s", self.describe(line))
        if line.get("in-turn") and not self._told_one_after_another:
            self._told_one_after_another = True  # once per run (process): the cause is the federation's
            log(WARNING, ONE_AFTER_ANOTHER_HINT, line["round"], line["replies"])
        return line

    def describe(self, line: dict) -> str:
        """The round's one readable log line."""
        evaluation = _scores(line, "") or "not evaluated"
        if validation := _scores(line, "val-"):
            evaluation += f" | validation {validation}"
        if line["round"] == 0:
            return f"[round 0/{self.num_rounds}] initial model | {evaluation}"
        ranks = line.get("ranks") or {}
        budget = (f"budget {line['budget']} (ranks {min(ranks.values())}-{max(ranks.values())})"
                  if line.get("budget") is not None else "full model")
        dropped = f" | dropped {line['dropped']}" if line.get("dropped") else ""
        privacy = f" | epsilon {line['dp-epsilon']:.3f}" if line.get("dp-epsilon") is not None else ""
        if federated := _scores(line, "fed-"):
            evaluation += f" | federated {federated} ({line['eval-rows']} rows, {line['eval-replies']} nodes)"
        return (f"[round {line['round']}/{self.num_rounds}] {line['stage']} | {budget} | "
                f"down {line['bytes-down'] / MB:.2f} MB up {line['bytes-up'] / MB:.2f} MB | "
                f"{evaluation} | {line['round-seconds']:.1f} s{dropped}{privacy}")

    def summary(self, config: RunConfig, wall_seconds: float, model_dir: Path | None,
                best: BestRound | None = None, best_dir: Path | None = None) -> dict:
        """Totals and headline numbers of the run; ``best-model-*``: the lowest validation loss's round and model."""
        best = best or BestRound()
        return {"method": config.method, **run_totals(self.records), "wall-seconds": wall_seconds,
                "model-dir": str(model_dir) if model_dir else None,
                "best-model-round": best.round, "best-model-loss": best.loss,
                "best-model-dir": str(best_dir) if best_dir and best.round is not None else None}

    def plot(self, run_dir: Path) -> list[Path]:
        """The run's plots (accuracy vs round and vs MB, budget, per-module ranks)."""
        from .plots import plot_ranks, plot_runs

        paths = plot_runs({"run": self.records}, run_dir)
        ranks = plot_ranks(self.records, run_dir / "ranks_vs_round.png")
        return paths + ([ranks] if ranks else [])
