"""The thin runner: every planned run through ``flwr run`` (:class:`~safedlora_app.tools.simulation.LocalFlower`).

Also the checks around it: whether a finished run was made with the planned settings, and where the comparison
ran. Only a comparison that runs imports this module (and with it flwr, pandas, tqdm and the app's training code).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from safedlora_app.core.checks import is_number
from safedlora_app.core.config import DEPRECATED_VALUES
from safedlora_app.core.run_folder import RunFolder
from safedlora_app.server.outputs import run_totals

from .plan import CompareError, RunSpec, estimate_seconds, run_config_string
from .store import RunStore, local_dtype
from .tables import MB, run_dir


# --- Checks: resuming, the machine -----------------------------------------------------------------
def config_mismatch(planned: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Keys whose value in a finished run's ``config.json`` (``given``) differs from the plan. ``precision``
    is left out: the arithmetic it chose counts instead, as in the run store (:func:`Comparison.finished`)."""
    ignore = {"out-dir", "run-name", "cache-dir", "precision"}
    return [f"{k}: planned {v!r}, found {given.get(k)!r}" for k, v in planned.items()
            if k not in ignore and not _same(v, DEPRECATED_VALUES.get(k, {}).get(given.get(k), given.get(k)))]


def _same(a: Any, b: Any) -> bool:
    """Equal, counting 8 and 8.0 as the same (TOML may give either); a run made under a deprecated value's
    old name counts as made with its new name."""
    numbers = is_number(a) and is_number(b)
    return float(a) == float(b) if numbers else a == b


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
    status: str  # "finished", "skipped" (finished earlier), "reused" (copied from a RunStore), "failed"
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
    reuse : RunStore, optional
        Stored runs to copy in instead of running a planned run made with the same full run-config.
    store : RunStore, optional
        Where every run finished here is stored (its small outputs).
    """

    def __init__(self, root: Path, say: Callable[[str], None] = print, flower_factory=None,
                 reuse: RunStore | None = None, store: RunStore | None = None):
        self.root = root
        self.say = say
        self.reuse, self.store = reuse, store
        if flower_factory is None:
            from safedlora_app.tools.simulation import LocalFlower
            flower_factory = LocalFlower
        self.flower_factory = flower_factory
        self._flower = None
        self._home: Path | None = None
        self.outcomes: dict[str, Outcome] = {}

    def run_dir(self, spec: RunSpec) -> Path:
        return run_dir(self.root, spec)

    def settings_with_output(self, spec: RunSpec) -> dict[str, Any]:
        return {**spec.settings, "out-dir": str(self.root / "runs" / spec.split), "run-name": spec.run_name,
                "cache-dir": str(self.root / "cache")}  # node caches stay with the comparison

    def command(self, spec: RunSpec) -> list[str]:
        """The ``flwr run`` command line of a run (as LocalFlower runs it)."""
        from safedlora_app.tools.simulation import APP_ROOT, BIN

        return [str(BIN / "flwr"), "run", str(APP_ROOT), "--stream", "--run-config",
                run_config_string(self.settings_with_output(spec)), "--federation-config", spec.federation]

    def finished(self, spec: RunSpec) -> bool:
        """Whether the run finished earlier (and was made with the same settings)."""
        run_dir = self.run_dir(spec)
        folder = RunFolder(run_dir)
        if not folder.finished:
            return False
        given = folder.given()
        problems = config_mismatch(spec.settings, given) if given else []
        made_with = given.get("precision", "auto")
        if given and made_with != spec.settings.get("precision", "auto"):
            from .store import local_dtype

            computed = folder.summary().get("compute-dtype")
            if computed != (planned := local_dtype(spec.settings)):
                problems.append(f"computed in {computed}, planned {planned}")
        if problems:
            raise CompareError(f"{run_dir} was made with other settings ({'; '.join(problems[:4])}); "
                               "choose another --name (or --out) for these settings")
        return True

    def run_all(self, plan: Sequence[RunSpec], phase: str = "", later: float = 0.0) -> list[Outcome]:
        """Run (or skip) every planned run in order, one progress line each, with an ETA.

        Progress is a tqdm bar over the *estimated* seconds of the work (``later``: the estimate of the runs
        of later phases), so its rate calibrates the estimate against this machine and its ETA weighs a
        full fine-tuning run more than a LoRA run.
        """
        self.reuse_stored(plan)
        todo = [s for s in plan if not self.finished(s)]
        remaining = sum(estimate_seconds(s) for s in todo) + later
        label = f"{phase}: " if phase else ""
        self.say(f"{label}{len(plan)} runs, {len(plan) - len(todo)} finished earlier, {len(todo)} to run "
                 f"(estimate {(remaining - later) / 60:.0f} min on 2 cores)")
        # The bar draws on a terminal only: in a log file its redraws would break the progress lines.
        screen = sys.stderr if sys.stderr.isatty() else open(os.devnull, "w")  # noqa: SIM115 (closed below)
        bar = tqdm(total=max(1, round(remaining)), desc=phase or "runs", unit="s", file=screen, leave=False,
                   bar_format="{desc}: {percentage:3.0f}% of the estimated work, {elapsed} elapsed, ETA {remaining}")
        try:
            return self._run_each(plan, todo, bar)
        finally:
            bar.close()
            if screen is not sys.stderr:
                screen.close()

    def reuse_stored(self, plan: Sequence[RunSpec]) -> None:
        """Copy in the stored run (``reuse``) of every planned run that has not finished here."""
        for spec in plan:
            if self.reuse is not None and not self.finished(spec) and (stored := self.reuse.find(
                    spec.settings, spec.num_supernodes, local_dtype(spec.settings))):
                self._move_aside(spec)
                self.reuse.copy_into(stored, self.run_dir(spec))
                self.outcomes[spec.key] = Outcome(spec, "reused", command=self.command(spec))
                self.say(f"{spec.key}: reused the stored run {stored}")

    def _run_each(self, plan: Sequence[RunSpec], todo: Sequence[RunSpec], bar: tqdm) -> list[Outcome]:
        outcomes = []
        for index, spec in enumerate(plan, 1):
            tag = f"[{index}/{len(plan)}] {spec.key}"
            if spec not in todo:
                # A run the lr search made in this invocation keeps its outcome (and measured seconds).
                earlier = self.outcomes.get(spec.key)
                outcome = earlier if earlier and earlier.status in ("finished", "reused") else Outcome(
                    spec, "skipped", command=self.command(spec))
                self.say(f"{tag}: finished earlier | {self.describe(spec)}")
            else:
                estimate = estimate_seconds(spec)
                self.say(f"{tag}: started ({spec.lr_key} {spec.settings[spec.lr_key]:g}, "
                         f"{spec.settings['num-server-rounds']} rounds, ~{estimate:.0f} s)")
                # A stall limit, not a wall-clock one: a busy machine may slow every round down many times over.
                outcome = self.run_one(spec, timeout=max(900.0, 2 * estimate))
                bar.update(round(estimate))
                eta = _eta_seconds(bar)
                if outcome.status == "finished" and self.store is not None:
                    try:
                        self.store.put(self.run_dir(spec), spec.split, spec.num_supernodes, spec.federation)
                    except (OSError, ValueError, KeyError) as error:  # the run itself is fine: go on
                        self.say(f"  WARNING: could not store {spec.key} in {self.store.root}: {error}")
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
        records = RunFolder(self.run_dir(spec)).records()
        t = run_totals(records)
        best = "" if t["best-accuracy"] is None else f" (best {t['best-accuracy']:.1%})"
        dropped = (f" | WARNING: {t['dropped-replies']} client replies dropped (see the log)"
                   if t["dropped-replies"] else "")
        return f"acc {t['final-accuracy']:.1%}{best} | {(t['bytes-down'] + t['bytes-up']) / MB:.2f} MB{dropped}"

    def run_one(self, spec: RunSpec, timeout: float) -> Outcome:
        """One ``flwr run``; a half-finished directory is moved to ``aborted/`` first."""
        run_dir = self.run_dir(spec)
        self._move_aside(spec)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = self.root / "logs" / spec.split / f"{spec.run_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        flower = self._ensure_flower()
        start = time.perf_counter()
        command = self.command(spec)
        try:
            result = flower.run(run_config_string(self.settings_with_output(spec)), timeout=timeout,
                                federation=spec.federation, progress=run_dir / "metrics.jsonl")
            output = result.stdout + result.stderr
        except subprocess.TimeoutExpired as error:
            output = _text(error.stdout) + _text(error.stderr)
            log.write_text(output)
            self.close()  # the ServerApp may still be running: stop that SuperLink (restarted on the next run)
            return Outcome(spec, "failed", time.perf_counter() - start,
                           f"stopped: no round ended in {timeout:.0f} s; log {log}", command)
        log.write_text(output)
        try:
            status = flower.run_status(output)
        except (AssertionError, json.JSONDecodeError, KeyError, IndexError, subprocess.SubprocessError) as error:
            status = f"unknown ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        seconds = time.perf_counter() - start
        if status != "finished:completed" or not RunFolder(run_dir).finished:
            return Outcome(spec, "failed", seconds, f"status {status}; log {log}", command)
        return Outcome(spec, "finished", seconds, "", command)

    def _move_aside(self, spec: RunSpec) -> None:
        """Move a half-finished run directory to ``aborted/`` (kept, never mixed with a new run)."""
        run_dir = self.run_dir(spec)
        if run_dir.exists():
            aside = self.root / "aborted" / spec.split / f"{spec.run_name}-{datetime.now():%Y%m%d-%H%M%S}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(run_dir), str(aside))
            self.say(f"  moved the unfinished {run_dir.name} to {aside.relative_to(self.root)}")

    def _ensure_flower(self):
        if self._flower is None:
            self._home = Path(tempfile.mkdtemp(prefix="safedlora-compare-flwr-"))
            self._flower = self.flower_factory(self._home)
        return self._flower

    def close(self) -> None:
        """Stop the SuperLink this comparison started and remove its Flower home."""
        if self._flower is not None:
            self._flower.stop()
            self._flower = None
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None


def _eta_seconds(bar: tqdm) -> float:
    """The bar's remaining wall time: estimated seconds left over the measured rate (estimated s per wall s)."""
    done, total, elapsed = bar.n, bar.total, bar.format_dict["elapsed"]
    return (total - done) * elapsed / done if done and elapsed else 0.0


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
