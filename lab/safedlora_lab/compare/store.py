"""Committed runs: the small outputs of finished runs, keyed by what they ran, for later comparisons.

A comparison that finds a stored run made with exactly a planned run's run-config and number of nodes, in the
arithmetic this machine would use (``precision = "auto"`` is bf16 on a CPU with AVX512-BF16 and float32 on one
without: the same seed then gives another run), copies it in instead of running it again. So a new method is
paired against fedavg's earlier seeds without new fedavg runs, and the tables can be rebuilt from the stored runs
alone (``--report-only``). Only ``SMALL_FILES`` and ``RUN_FILE`` are kept, never the models.

The key does not hold the app's code version (``RUN_FILE`` records the commit): a change to the training path
must come with a new store folder, or its runs would be reused with results the new code does not give.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safedlora_app.core.config import ConfigError, RunConfig
from safedlora_app.core.run_folder import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, RunFolder, without_where

#: What a stored run holds of the app's outputs: enough for every table, plot and paired difference.
SMALL_FILES = (CONFIG_FILE, SUMMARY_FILE, METRICS_FILE)
#: What the store adds: the number of nodes (not a run-config key) and where the run came from.
RUN_FILE = "run.json"


def full_config(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Every run-config key (today's defaults where ``settings`` is silent, e.g. a key added after the run was
    stored), typed as the app types them, without the keys that say where it was written (``run_folder.WHERE_KEYS``)."""
    config = RunConfig.from_mapping({**settings, "out-dir": "/unused", "run-name": "unused"}).to_dict()
    return without_where(config)


def run_key(settings: Mapping[str, Any], num_supernodes: int) -> str:
    """12 hex digits of the SHA-256 of the full run-config (:func:`full_config`) and the number of nodes.

    ``precision`` is left out: what it decides, the arithmetic, is the other half of a stored run's key (so a
    float32 run made with ``auto`` on a CPU without bf16 serves ``precision = "fp32"`` anywhere)."""
    what = {**full_config(settings), "num-supernodes": int(num_supernodes)}
    what.pop("precision")
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def local_dtype(settings: Mapping[str, Any]) -> str:
    """The compute dtype a run with these settings would use on this machine (``"float32"``, ``"bfloat16"``)."""
    from safedlora_app.core.model import pick_device
    from safedlora_app.core.training import compute_dtype

    return str(compute_dtype(full_config(settings)["precision"], pick_device())).removeprefix("torch.")


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


class RunStore:
    """A folder of stored runs, ``<root>/<split>/<run-name>-<key>-<dtype>/``; a run is found by its run-config,
    number of nodes and compute dtype alone, whatever its folder is called."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._index: dict[tuple[str, str | None], Path] | None = None

    def index(self) -> dict[tuple[str, str | None], Path]:
        """``{(run key, compute dtype): folder}`` of every complete stored run (read once). A folder whose
        config today's app rejects (a removed key, say) is left out."""
        if self._index is None:
            self._index = {}
            for folder in sorted(p.parent for p in self.root.glob(f"*/*/{RUN_FILE}")):
                if folder.name.endswith(".partial") or not all((folder / n).is_file() for n in SMALL_FILES):
                    continue
                try:
                    key = self._key_of(folder)
                except (ConfigError, KeyError, ValueError):
                    continue
                self._index[key] = folder
        return self._index

    @staticmethod
    def _key_of(folder: Path) -> tuple[str, str | None]:
        run, outputs = json.loads((folder / RUN_FILE).read_text()), RunFolder(folder)
        return run_key(outputs.given(), run["num-supernodes"]), outputs.summary().get("compute-dtype")

    def find(self, settings: Mapping[str, Any], num_supernodes: int, dtype: str) -> Path | None:
        """The stored run made with these settings (app defaults filled in) on ``num_supernodes`` nodes in
        ``dtype`` arithmetic (``"float32"``, ``"bfloat16"``; :func:`local_dtype`), or ``None``."""
        return self.index().get((run_key(settings, num_supernodes), dtype))

    def put(self, run_dir: Path, split: str, num_supernodes: int, federation: str = "") -> Path:
        """Store a finished run's small outputs (a run already stored under its key is left as it is)."""
        folder = RunFolder(run_dir)
        dtype = folder.summary().get("compute-dtype")
        key = (run_key(folder.given(), num_supernodes), dtype)
        if key in self.index():
            return self.index()[key]
        target = self.root / split / f"{run_dir.name}-{key[0]}-{dtype or 'unknown'}"
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name in SMALL_FILES:
            shutil.copy2(run_dir / name, partial / name)
        (partial / RUN_FILE).write_text(json.dumps({"num-supernodes": int(num_supernodes), "federation": federation,
                                                    "commit": _commit()}, indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier copy (not in the index)
        partial.rename(target)
        self.index()[key] = target
        return target

    @staticmethod
    def copy_into(stored: Path, run_dir: Path) -> None:
        """Make the empty ``run_dir`` a finished run with the stored outputs (summary.json last: it marks the run
        finished)."""
        run_dir.mkdir(parents=True)
        for name in SMALL_FILES:
            if name != SUMMARY_FILE:
                shutil.copy2(stored / name, run_dir / name)
        shutil.copy2(stored / SUMMARY_FILE, run_dir / SUMMARY_FILE)
