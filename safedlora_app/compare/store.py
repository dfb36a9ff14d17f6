"""Committed runs: the small outputs of finished runs, keyed by their full run-config, for later comparisons.

A comparison that finds a stored run made with exactly a planned run's settings, in the arithmetic this machine
would use (``precision = "auto"`` is bf16 on a CPU with AVX512-BF16, float32 on one without: the same seed then
gives another run), copies it in instead of running it again, so a new method is paired against fedavg's earlier
seeds without new fedavg runs, and the tables can be rebuilt from the stored runs alone (``--report-only``).
Only ``SMALL_FILES`` are kept, never the models.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import RunConfig

#: What a stored run holds: enough for every table, plot and paired difference.
SMALL_FILES = ("config.json", "summary.json", "metrics.jsonl")
#: Keys that say where a run was written, not what it ran.
WHERE_KEYS = ("out-dir", "run-name", "cache-dir", "resume")


def full_config(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Every run-config key of a planned run (the app's defaults where ``settings`` is silent), typed as the
    app types them, without ``WHERE_KEYS``."""
    config = RunConfig.from_mapping({**settings, "out-dir": "/unused", "run-name": "unused"}).to_dict()
    return {k: v for k, v in config.items() if k not in WHERE_KEYS}


def config_key(config: Mapping[str, Any]) -> str:
    """12 hex digits of the SHA-256 of ``config`` without ``WHERE_KEYS`` (sorted JSON)."""
    what = {k: v for k, v in config.items() if k not in WHERE_KEYS}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def local_dtype(settings: Mapping[str, Any]) -> str:
    """The compute dtype a run with these settings would use on this machine (``"float32"``, ``"bfloat16"``)."""
    from ..model import pick_device
    from ..training import compute_dtype

    return str(compute_dtype(full_config(settings)["precision"], pick_device())).removeprefix("torch.")


class RunStore:
    """A folder of stored runs: ``<root>/<split>/<run-name>-<config key>/{config.json, summary.json,
    metrics.jsonl}``; a run is found by its full run-config alone, whatever its folder is called."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._index: dict[str, Path] | None = None

    def index(self) -> dict[tuple[str, str | None], Path]:
        """``{(config key, compute dtype): run folder}`` of every complete stored run (read once)."""
        if self._index is None:
            self._index = {}
            for config in sorted(self.root.glob("*/*/config.json")):
                folder = config.parent
                if all((folder / name).is_file() for name in SMALL_FILES):
                    dtype = json.loads((folder / "summary.json").read_text()).get("compute-dtype")
                    self._index[(config_key(json.loads(config.read_text())["given"]), dtype)] = folder
        return self._index

    def find(self, settings: Mapping[str, Any], dtype: str) -> Path | None:
        """The stored run made with exactly these settings (app defaults filled in) in ``dtype`` arithmetic
        (``"float32"``, ``"bfloat16"``; :func:`local_dtype`), or ``None``."""
        return self.index().get((config_key(full_config(settings)), dtype))

    def put(self, run_dir: Path, split: str) -> Path:
        """Store a finished run's small outputs (a run already stored under its key is left as it is)."""
        given = json.loads((run_dir / "config.json").read_text())["given"]
        key = (config_key(given), json.loads((run_dir / "summary.json").read_text()).get("compute-dtype"))
        if key in self.index():
            return self.index()[key]
        target = self.root / split / f"{run_dir.name}-{key[0]}-{key[1] or 'unknown'}"
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name in SMALL_FILES:
            shutil.copy2(run_dir / name, partial / name)
        partial.rename(target)
        self.index()[key] = target
        return target

    @staticmethod
    def copy_into(stored: Path, run_dir: Path) -> None:
        """Make ``run_dir`` a finished run with the stored outputs (summary.json last: it marks it finished)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in SMALL_FILES:
            if name != "summary.json":
                shutil.copy2(stored / name, run_dir / name)
        shutil.copy2(stored / "summary.json", run_dir / "summary.json")
