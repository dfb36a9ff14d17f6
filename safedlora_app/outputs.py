"""Run outputs under ``out-dir/<run-name>/``: config, per-round metrics, summary, model, plots.

``metrics.jsonl`` gets one line per round as soon as the round ends (flushed and fsynced), so a
crash loses at most the round in flight.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import datetime
from logging import INFO
from pathlib import Path

from flwr.supercore import log

from .config import RunConfig
from .plots import plot_ranks, plot_runs
from .strategy import RoundStats

MB = 1e6
EVALUATION_KEYS = ("accuracy", "macro-f1", "loss", "eval-seconds")


def run_directory(config: RunConfig) -> Path:
    """Create and return the absolute run directory (refusing to mix two runs' metrics)."""
    name = config.run_name or f"{config.method}-{datetime.now():%Y%m%d-%H%M%S}"
    path = Path(os.path.expanduser(config.out_dir)).resolve() / name
    if (path / "metrics.jsonl").exists():
        raise FileExistsError(f"run-name = {name!r}: {path} already holds a run; choose another run-name")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, data) -> None:
    """Write JSON atomically (temp file + rename)."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    partial.replace(path)


class RunRecorder:
    """Collects each round's communication stats and central evaluation into metrics.jsonl."""

    def __init__(self, run_dir: Path, num_rounds: int):
        self.path = run_dir / "metrics.jsonl"
        self.num_rounds = num_rounds
        self.records: list[dict] = []
        self._last = time.perf_counter()
        self._cum_down = self._cum_up = 0

    def record(self, stats: RoundStats | None, server_round: int, evaluation: dict[str, float] | None) -> dict:
        """Append the line for ``server_round`` (round 0: the initial model, nothing sent).

        A round without central evaluation (``eval-every``) has ``null`` accuracy, macro-F1, loss and
        eval-seconds.
        """
        now = time.perf_counter()
        # Round 0 (the initial model) has the same fields as every other line, all zero.
        row = dataclasses.asdict(stats or RoundStats(round=0, stage="initial", kind="none"))
        self._cum_down += row["bytes_down"]
        self._cum_up += row["bytes_up"]
        line = {k.replace("_", "-"): v for k, v in row.items()}
        line.update({
            "cumulative-bytes-down": self._cum_down,
            "cumulative-bytes-up": self._cum_up,
            "cumulative-bytes": self._cum_down + self._cum_up,
            "cumulative-mb": (self._cum_down + self._cum_up) / MB,
            **(evaluation or dict.fromkeys(EVALUATION_KEYS)),
            "round-seconds": now - self._last,
        })
        self._last = now
        with self.path.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(line)
        log(INFO, "%s", self.describe(line))
        return line

    def describe(self, line: dict) -> str:
        """The round's one readable log line."""
        evaluation = ("not evaluated" if line["accuracy"] is None
                      else f"acc {line['accuracy']:.1%} f1 {line['macro-f1']:.3f}")
        if line["round"] == 0:
            return f"[round 0/{self.num_rounds}] initial model | {evaluation}"
        ranks = line.get("ranks") or {}
        budget = (f"budget {line['budget']} (ranks {min(ranks.values())}-{max(ranks.values())})"
                  if line.get("budget") is not None else "full model")
        dropped = f" | dropped {line['dropped']}" if line.get("dropped") else ""
        return (f"[round {line['round']}/{self.num_rounds}] {line['stage']} | {budget} | "
                f"down {line['bytes-down'] / MB:.2f} MB up {line['bytes-up'] / MB:.2f} MB | "
                f"{evaluation} | {line['round-seconds']:.1f} s{dropped}")

    def summary(self, config: RunConfig, wall_seconds: float, model_dir: Path | None) -> dict:
        """Totals and headline numbers of the run."""
        rows = [r for r in self.records if r["round"] > 0]
        final = self.records[-1] if self.records else {}
        evaluated = [r for r in rows if r.get("accuracy") is not None]
        best = max(evaluated, key=lambda r: r["accuracy"], default={})  # trained rounds only
        return {
            "method": config.method,
            "rounds": len(rows),
            "final-accuracy": final.get("accuracy"),
            "final-macro-f1": final.get("macro-f1"),
            "final-loss": final.get("loss"),
            "best-accuracy": best.get("accuracy"),
            "best-round": best.get("round"),
            "bytes-down": sum(r["bytes-down"] for r in rows),
            "bytes-up": sum(r["bytes-up"] for r in rows),
            "params-down": sum(r["params-down"] for r in rows),
            "params-up": sum(r["params-up"] for r in rows),
            "total-mb": (sum(r["bytes-down"] + r["bytes-up"] for r in rows)) / MB,
            "dropped-replies": sum(r["dropped"] for r in rows),
            "rounds-without-replies": sum(1 for r in rows if r["replies"] == 0),
            "final-ranks": final.get("ranks") or {},
            "wall-seconds": wall_seconds,
            "model-dir": str(model_dir) if model_dir else None,
        }

    def plot(self, run_dir: Path) -> list[Path]:
        """The run's plots (accuracy vs round and vs MB, budget, per-module ranks)."""
        paths = plot_runs({"run": self.records}, run_dir)
        ranks = plot_ranks(self.records, run_dir / "ranks_vs_round.png")
        return paths + ([ranks] if ranks else [])
