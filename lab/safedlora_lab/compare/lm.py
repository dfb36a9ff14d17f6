"""``safedlora compare --task causal-lm``: sa-fedlora against the fixed-rank baselines on the causal-lm defaults.

    safedlora compare --task causal-lm [--methods sa-fedlora,fedit-rmax,ffa-lora] [--out results]
                      [--name causal-lm] [--seeds 3] [--set KEY=VALUE ...] [--report-only]

Each (arm, seed) is one ``flwr run`` of ``task = "causal-lm"`` on its defaults (2 simulated nodes, SmolLM2, the
chitchat conversations), the arm's run-config (``arms/<arm>.toml``) and ``--set`` values over them, into
``<out>/<name>/runs/<method>-s<seed>`` (named by the app's ``method``: ``sa-fedlora``, ``fedit``, ``ffa-lora``).
A finished run is skipped, and an interrupted one resumes from its checkpoint, so the command goes on where it
stopped. ``<out>/<name>/table.md`` holds each finished run's final and best held-out loss and MB sent, and
sa-fedlora minus each baseline per seed with the mean difference and its 95% Student-t interval. The baselines run
at sa-fedlora's rank-max, on the same modules and wire dtype. ``--report-only --out docs/results`` rebuilds the
committed table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from safedlora_app.core.run_folder import RunFolder
from safedlora_app.tools.simulation import LocalFlower

from .plan import ARMS, FIRST_SEED, run_config_string
from .tables import paired_interval

#: The arms --task causal-lm may run, the first against each other; run names use the arm's ``method``, as the
#: committed runs do.
LM_ARMS = ("sa-fedlora", "fedit-rmax", "ffa-lora")
#: Seconds without a new metrics.jsonl line before a run counts as stuck.
STALL_TIMEOUT = 900


def method_of(arm: str) -> str:
    """The app's ``method`` an arm runs: its runs' name."""
    return ARMS[arm].run_config["method"]


def lm_settings(arm: str, seed: int, runs: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """One run's run-config; a run interrupted after round 0 continues from its checkpoint (``resume``)."""
    name = f"{method_of(arm)}-s{seed}"
    return {"task": "causal-lm", **settings, **ARMS[arm].run_config, "seed": seed,
            "out-dir": str(runs), "run-name": name, "resume": RunFolder(runs / name).started}


def compare_lm(root: Path, seeds: Sequence[int], settings: Mapping[str, Any], report_only: bool = False,
               say: Callable[[str], None] = print, arms: Sequence[str] = LM_ARMS) -> int:
    """Run (unless ``report_only``) every arm and seed into ``root``, then write and print the table."""
    runs = root / "runs"
    if not report_only:
        root.mkdir(parents=True, exist_ok=True)
        (root / "flwr-home").mkdir(exist_ok=True)
        flower = LocalFlower(root / "flwr-home")
        try:
            for seed in seeds:  # seed by seed: each finished seed is a finished pair
                for method in map(method_of, arms):
                    folder = RunFolder(runs / f"{method}-s{seed}")
                    if folder.finished:
                        continue
                    started = time.time()
                    say(f"{time.strftime('%H:%M:%S')} {method} seed {seed} ...")
                    arm = next(a for a in arms if method_of(a) == method)
                    result = flower.run(run_config_string(lm_settings(arm, seed, runs, settings)),
                                        timeout=STALL_TIMEOUT, progress=folder.file("metrics.jsonl"))
                    (root / f"{method}-s{seed}.log").write_text(result.stdout + result.stderr)
                    done = folder.summary()
                    say(f"{time.strftime('%H:%M:%S')} {method} seed {seed}: "
                        f"{'final loss %.4f' % done['final-loss'] if done else 'FAILED (see its log)'} "
                        f"in {time.time() - started:.0f} s")
        finally:
            flower.stop()
    say(report(root, seeds, settings))
    return 0


def report(root: Path, seeds: Sequence[int], settings: Mapping[str, Any]) -> str:
    """``table.md``: every finished run, and sa-fedlora minus each baseline with finished pairs, paired by seed."""
    methods = [method_of(arm) for arm in LM_ARMS]
    folders = {(m, s): RunFolder(root / "runs" / f"{m}-s{s}") for m in methods for s in seeds}
    lines = ["| method | seed | final loss | best loss | final perplexity | MB sent | wall s |",
             "|---|---|---|---|---|---|---|"]
    for (method, seed), folder in folders.items():
        if s := folder.summary():
            best = min(r["loss"] for r in folder.rounds() if r["loss"] is not None)
            lines.append(f"| {method} | {seed} | {s['final-loss']:.4f} | {best:.4f} | {s['final-perplexity']:.2f} "
                         f"| {s['total-mb']:.2f} | {s['wall-seconds']:.0f} |")
    first = methods[0]
    for other in methods[1:]:
        pairs = [(a, b) for s in seeds if (a := folders[first, s].summary()) and (b := folders[other, s].summary())]
        if not pairs:
            continue
        lines += ["", f"Paired by seed ({len(pairs)} pairs), {first} minus {other}:", ""]
        for label, key in (("final held-out loss", "final-loss"), ("MB sent", "total-mb")):
            diffs = [a[key] - b[key] for a, b in pairs]
            interval = paired_interval(diffs)
            text = "n/a (fewer than 3 pairs)" if interval is None else \
                f"{interval[0]:+.4f} (95% interval {interval[1]:+.4f} to {interval[2]:+.4f})"
            lines.append(f"- {label}: {text}; per seed {', '.join(f'{d:+.4f}' for d in diffs)}")
        ratio = [a["total-mb"] / b["total-mb"] for a, b in pairs]
        lines.append(f"- bytes of {first} / {other}: {min(ratio):.3f}-{max(ratio):.3f}")
    lines += ["", f"Settings over the causal-lm defaults: {dict(settings) or 'none'}."]
    text = "\n".join(lines) + "\n"
    (root / "table.md").write_text(text)
    return text


def lm_seeds(count: int) -> list[int]:
    return [FIRST_SEED + k for k in range(count)]
