"""A run's folder, ``out-dir/<run-name>/``: the names of its files, and the one reader of them.

The ServerApp writes them (``server_app.py`` the config and the summary, ``server/outputs.py`` one
``metrics.jsonl`` line per round); the lab, the benchmarks and the tests read them through :class:`RunFolder`.
Pure: no Flower, no torch.

- ``config.json``: ``given`` (the keys set for the run) and ``effective`` (every key as the run used it),
  without :data:`WHERE_KEYS`: a stored run says what it ran, not where it happened to be written.
- ``metrics.jsonl``: one JSON object per round (round 0 is the initial model's evaluation), appended and
  fsynced as each round ends.
- ``summary.json``: written last, when the run finished; its presence marks a finished run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.json", "metrics.jsonl", "summary.json"
#: Run-config keys that say where a run was written or how it was started, not what it ran.
WHERE_KEYS = ("out-dir", "run-name", "cache-dir", "resume")


def without_where(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without :data:`WHERE_KEYS` (what ``config.json`` stores)."""
    return {k: v for k, v in config.items() if k not in WHERE_KEYS}


@dataclass(frozen=True)
class RunFolder:
    """The files of one run's folder, read on demand (a running run's files grow between two reads)."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def started(self) -> bool:
        """Whether a round's line was written (a run to resume)."""
        return self.file(METRICS_FILE).exists()

    @property
    def finished(self) -> bool:
        """Whether the run finished (its summary is written last)."""
        return self.file(SUMMARY_FILE).exists()

    def config(self) -> dict[str, Any]:
        """``config.json``: ``given``, ``effective`` and the run's provenance."""
        return json.loads(self.file(CONFIG_FILE).read_text())

    def given(self) -> dict[str, Any]:
        """The run-config keys set for the run ({} where the folder has no config)."""
        return self.config().get("given", {}) if self.file(CONFIG_FILE).exists() else {}

    def effective(self) -> dict[str, Any]:
        """Every run-config key as the run used it."""
        return self.config()["effective"]

    def records(self) -> list[dict[str, Any]]:
        """Every ``metrics.jsonl`` line, round 0 first ([] before the first line). An unfinished run's last line
        cut short by a crash mid-write is left out (the run resumes from its checkpoint, which rewrites it); in a
        finished run every line must be whole."""
        if not self.started:
            return []
        lines = [line for line in self.file(METRICS_FILE).read_text().splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines) or self.finished:
                    raise ValueError(f"{self.file(METRICS_FILE)}: line {number} is not JSON") from None
        return records

    def rounds(self) -> list[dict[str, Any]]:
        """The lines of the training rounds (round 0, the initial model, left out)."""
        return [r for r in self.records() if r["round"] > 0]

    def summary(self) -> dict[str, Any] | None:
        """``summary.json``, or ``None`` while the run has not finished."""
        return json.loads(self.file(SUMMARY_FILE).read_text()) if self.finished else None
