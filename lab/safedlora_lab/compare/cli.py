"""The command line: ``safedlora compare`` options, the dry run, and the comparison from plan to results.

``--help`` and ``--dry-run`` import :mod:`.plan` alone; the runner, the store and the tables (flwr, pandas, tqdm,
the app's training code) are imported in :func:`compare`, where runs happen.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .plan import (
    FEDERATION,
    FIRST_SEED,
    HEADLINE,
    LR_EXTENSION_LIMIT,
    LR_GRID,
    METHOD_DESCRIPTIONS,
    METHODS,
    PRESETS,
    PROTOCOL_PAIRS,
    SPLITS,
    TUNE_SEED,
    CompareError,
    CompareOptions,
    RunSpec,
    choose_lr,
    chosen_multipliers,
    estimate_seconds,
    extend_lr_grid,
    lr_key,
    lr_source,
    parse_choices,
    parse_set,
    plan_lr_search,
    run_config_string,
    stage_rounds,
)

if TYPE_CHECKING:
    from .runner import Comparison

#: The runs committed with the app (relative to the app's directory), reused by default: those of the protocol.
#: The older ones (docs/results/runs) ran on data before deduplication and the validation split: a record only.
STORED_RUNS = "docs/results/protocol-runs"
#: --task: the comparison of the tweets' splits (the default), or the language-model comparison (:mod:`.lm`).
TASKS = ("text-classification", "causal-lm")
#: What --task causal-lm reads of the command line (argparse dests); any other option given is refused.
LM_OPTIONS = {"command", "task", "methods", "out", "name", "seeds", "set", "report_only"}
#: What the lab installs beyond the app (pyproject's lab extra): a missing one gets a clear error.
LAB_DEPENDENCIES = ("pandas", "scipy", "tqdm")


# --- Command line ----------------------------------------------------------------------------------
def integer_at_least(low: int) -> Callable[[str], int]:
    """argparse ``type=``: a whole number >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; it must be an integer >= {low}")
        return value
    return parse


def fraction(text: str) -> float:
    """argparse ``type=``: a fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; it must be a fraction in (0, 1], e.g. 0.55")
    return value


def choices_of(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """argparse ``type=``: a comma-separated list of items from ``allowed``."""
    def parse(text: str) -> tuple[str, ...]:
        try:
            return parse_choices(text, allowed)
        except CompareError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return parse


def multipliers_of(allowed: Sequence[str]) -> Callable[[str], dict[str, float]]:
    """argparse ``type=``: ``"fedavg=2,sa-fedlora=0.5"`` -> ``{"fedavg": 2.0, "sa-fedlora": 0.5}``."""
    def parse(text: str) -> dict[str, float]:
        out = {}
        for item in (i.strip() for i in text.split(",") if i.strip()):
            method, _, raw = item.partition("=")
            try:
                value = float(raw)
            except ValueError:
                value = float("nan")
            if method.strip() not in allowed or not 0 < value < math.inf:
                raise argparse.ArgumentTypeError(
                    f"{item!r} is not allowed; write METHOD=X with X > 0 and METHOD one of: {', '.join(allowed)}")
            out[method.strip()] = value
        if not out:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; write e.g. 'fedavg=2,sa-fedlora=2'")
        return out
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safedlora", description="SA-FedLoRA tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "compare", help="run every method on the same seeds, partitions and evaluation; write tables and plots",
        description="Run fedavg, fedprox, fedit (rank-max and rank-min), sa-fedlora and its ablations on the "
                    "same seeds, partitions, rounds, clients and evaluation, through `flwr run`, and write "
                    "<out>/<name>/{runs,plots,table.csv,table.md,comparison.json}. Finished runs are skipped "
                    "when the command is run again.")
    p.add_argument("--task", choices=TASKS, default=TASKS[0],
                   help="text-classification (default): the methods on the tweets' splits; causal-lm: sa-fedlora "
                        "against fedit-rmax and ffa-lora on the causal-lm defaults, paired by seed (with --arms, "
                        "--out, --name, --seeds, --set and --report-only alone)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="protocol",
                   help="'protocol' (default): the app's two points as shipped against fedavg and fixed-rank LoRA "
                        "under docs/comparison.md's protocol (lr searched on validation, tuning seed apart); "
                        "'full': sa-fedlora's ablations; 'quick': a smoke of the pipeline. --dry-run prints the "
                        "hours each takes")
    p.add_argument("--quick", action="store_true", help="the same as --preset quick (< 10 min on 2 cores)")
    p.add_argument("--tune-seed", type=int, default=TUNE_SEED,
                   help=f"the seed the lr search runs on (default {TUNE_SEED}); it must not be a reporting seed")
    p.add_argument("--name", default=None, help="results sub-directory (default: the preset's name)")
    p.add_argument("--out", default="results",
                   help="results directory, relative to the current directory or absolute (default: results)")
    p.add_argument("--seeds", type=integer_at_least(1), default=None,
                   help=f"seeds for the headline methods (>= 1; first seed is {FIRST_SEED}, then {FIRST_SEED + 1}, "
                        "...); default: preset")
    p.add_argument("--ablation-seeds", type=integer_at_least(1), default=None,
                   help="seeds for the methods other than fedavg, fedit-rmax and sa-fedlora, and for those three "
                        "on the splits outside --headline-splits (the first ones of --seeds; at most --seeds); "
                        "default: preset")
    p.add_argument("--ablation-splits", type=choices_of(tuple(SPLITS)), default=None,
                   help="splits for the methods other than fedavg, fedit-rmax and sa-fedlora (comma-separated, "
                        "from --splits); default: preset")
    p.add_argument("--headline-splits", type=choices_of(tuple(SPLITS)), default=None,
                   help="splits on which fedavg, fedit-rmax and sa-fedlora run all --seeds (comma-separated, from "
                        "--splits); on the other splits they run the first --ablation-seeds, so 'natural' with "
                        "--seeds 5 and --ablation-seeds 3 adds seeds on the natural split only; default: all of "
                        "--splits")
    # The arms of lab/safedlora_lab/arms/ (a run-config each), not the app's `method` key; --methods is the old name.
    p.add_argument("--arms", "--methods", dest="methods", type=choices_of(tuple(METHODS)), default=None,
                   help=f"comma-separated arms (lab/safedlora_lab/arms/*.toml), from: {', '.join(METHODS)}; "
                        "default: the preset's (--methods: the same, its older name)")
    p.add_argument("--splits", type=choices_of(tuple(SPLITS)), default=None,
                   help=f"comma-separated, from: {', '.join(SPLITS)}; default: preset")
    p.add_argument("--rounds", type=integer_at_least(1), default=None, help="num-server-rounds (>= 1); default: preset")
    p.add_argument("--lr-search", action="store_true",
                   help=f"first try lr multipliers {', '.join(f'x{m:g}' for m in LR_GRID)} (extended by doubling or "
                        f"halving, up to x{LR_EXTENSION_LIMIT:g} or x1/{LR_EXTENSION_LIMIT:g}, while the best is at "
                        "an edge) for every method on the tuning seed (--tune-seed) and first split, choosing by "
                        "final validation loss, then use each method's best (always on with --preset protocol)")
    p.add_argument("--lr-multipliers", type=multipliers_of(tuple(METHODS)), default={}, metavar="METHOD=X,...",
                   help="fixed lr multipliers, e.g. 'fedavg=2,sa-fedlora=2' (an earlier search's choice): those "
                        "methods, and the methods that take their rate, are not searched again")
    p.add_argument("--target-accuracy", type=fraction, default=None,
                   help="accuracy (fraction in (0, 1]) for the rounds-to-target column; default: preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config value for every run, over the preset's (repeatable), e.g. --set test-size=1000")
    p.add_argument("--reuse", default=None, metavar="DIR",
                   help="stored runs (see --store) to copy in for planned runs made with exactly the same "
                        f"run-config, instead of running them again; default: the app's {STORED_RUNS}, if present")
    p.add_argument("--no-reuse", action="store_true", help="run every planned run, even one stored already")
    p.add_argument("--store", default=None, metavar="DIR",
                   help="store each run finished here (config.json, summary.json, metrics.jsonl; no models) in DIR, "
                        f"keyed by its run-config, e.g. {STORED_RUNS} to commit them with the app")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and their run-config; run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="write the tables, plots and comparison.json from the runs finished so far; run nothing "
                        "(e.g. while the comparison runs, or after it was interrupted)")
    return parser


def packaged_with_app(root: Path, app_root: Path) -> bool:
    """Whether ``flwr run <app_root>`` would pack files under ``root`` into the app bundle (FAB).

    Flower packs every ``*.json``/``*.jsonl``/``*.md`` under the app directory that ``.gitignore``
    does not exclude, and refuses bundles over 10 MB or paths nested too deep: results written
    there would break every later run. Uses Flower's own filter.
    """
    try:
        relative = root.resolve().relative_to(app_root.resolve())
    except ValueError:
        return False
    from flwr.cli.utils import filter_paths_for_publish  # here: only results inside the app need it (1 s)

    gitignore = app_root / ".gitignore"
    probe = (relative / "table.md").as_posix()
    files = {probe: b"", ".gitignore": gitignore.read_bytes() if gitignore.exists() else b""}
    try:
        return probe in filter_paths_for_publish(files)
    except Exception:  # e.g. the path is nested too deep for Flower: it would break runs too
        return True


def check_within_splits(option: str, chosen: Sequence[str] | None, splits: Sequence[str]) -> None:
    """Raise ``CompareError`` naming the splits of ``option`` that ``--splits`` leaves out."""
    outside = [s for s in chosen or () if s not in splits]
    if outside:
        raise CompareError(f"{option} = {','.join(outside)} is not allowed: the comparison runs only the "
                           f"splits {','.join(splits)} (--splits)")


def resolve_options(args: argparse.Namespace, cwd: Path | None = None) -> CompareOptions:
    """Turn parsed arguments into the comparison's options; every bad value raises ``CompareError``.

    What the command line leaves out comes from the preset (``--quick`` or the full one), and every planned
    run-config passes the app's own validation before anything starts.
    """
    from safedlora_app.core.config import ConfigError, RunConfig

    preset = PRESETS["quick" if args.quick else args.preset]
    name = args.name if args.name is not None else preset.name
    if not name or "/" in name or name in (".", "..") or name.startswith("-"):
        raise CompareError(f"--name = {name!r} is not allowed; it must be a plain directory name, e.g. 'full'")
    out = Path(os.path.expanduser(args.out))
    root = (out if out.is_absolute() else (cwd or Path.cwd()) / out).resolve() / name
    n_seeds = args.seeds or preset.seeds
    ablation_seeds = args.ablation_seeds or min(preset.ablation_seeds, n_seeds)
    if ablation_seeds > n_seeds:
        raise CompareError(f"--ablation-seeds = {ablation_seeds} is not allowed: the ablations use the first of the "
                           f"{n_seeds} seeds (--seeds), so it must be at most {n_seeds}")
    rounds = args.rounds or preset.rounds
    splits = args.splits or preset.splits
    check_within_splits("--ablation-splits", args.ablation_splits, splits)
    check_within_splits("--headline-splits", args.headline_splits, splits)
    from safedlora_app.tools.simulation import APP_ROOT

    if packaged_with_app(root, APP_ROOT):
        raise CompareError(
            f"--out/--name = {root} is not allowed: it lies inside the app directory {APP_ROOT} and is not "
            "excluded by its .gitignore, so `flwr run` would pack the results (*.json, *.md) into the app "
            "bundle (10 MB limit). Use an --out outside the app directory, or add the folder (e.g. '/results/') "
            "to .gitignore")
    reuse = None if args.no_reuse else Path(os.path.expanduser(args.reuse)) if args.reuse else APP_ROOT / STORED_RUNS
    if args.reuse and not args.no_reuse and not reuse.is_dir():
        raise CompareError(f"--reuse = {args.reuse!r} is not allowed: no such directory")
    defaults = RunConfig()
    if preset.shared_stages:
        settings = {"lr": defaults.lr, "full-lr": defaults.full_lr, **preset.settings, "num-server-rounds": rounds,
                    **stage_rounds(rounds), **parse_set(args.set)}
    else:  # every arm is the app's defaults plus its row's key (docs/comparison.md, "The protocol")
        settings = {**preset.settings, "num-server-rounds": rounds, **parse_set(args.set)}
    seeds = tuple(FIRST_SEED + i for i in range(n_seeds))
    if args.tune_seed in seeds:
        raise CompareError(f"--tune-seed = {args.tune_seed} is not allowed: it is one of the reporting seeds "
                           f"{seeds[0]}-{seeds[-1]}; a number chosen on a seed must not be reported on it")
    options = CompareOptions(
        preset=preset.name, root=root, seeds=seeds, splits=splits,
        methods=args.methods or preset.methods, target=args.target_accuracy or preset.target_accuracy,
        settings=settings, tune_seed=args.tune_seed, lr_search=bool(args.lr_search or preset.lr_search),
        fixed_lrs=dict(args.lr_multipliers),
        ablation_seeds=ablation_seeds, ablation_splits=args.ablation_splits or preset.ablation_splits,
        headline_splits=args.headline_splits or splits, dry_run=args.dry_run, report_only=args.report_only,
        reuse=reuse if reuse is not None and reuse.is_dir() else None,
        store=Path(os.path.expanduser(args.store)).resolve() if args.store else None)
    try:
        specs = options.plan() + (searched_runs(options) if options.lr_search else [])
    except ConfigError as error:  # a method's own rate is read from its resolved run-config
        raise CompareError(f"the planned run-config: {error}") from None
    for spec in specs:
        try:
            RunConfig.from_mapping({**spec.settings, "out-dir": str(root), "run-name": spec.run_name})
        except ConfigError as error:
            raise CompareError(f"run {spec.key}: {error}") from None
    return options


def print_plan(options: CompareOptions, say: Callable[[str], None] = print) -> None:
    """The dry run: every planned run with its run-config string and federation config."""
    runs = []
    if options.lr_search:
        search = searched_runs(options)
        say(f"lr search ({len(search)} runs on {options.splits[0]}, tuning seed {options.tune_seed}):")
        runs += search
        for spec in search:
            say(f"  {spec.key}  --run-config \"{run_config_string(spec.settings)}\"  "
                f"--federation-config \"{spec.federation}\"")
        say("comparison (shown at x1, or a fixed --lr-multipliers; each other method then uses the multiplier its "
            "search picks; runs that the search already made are not repeated):")
    plan = options.plan(chosen_multipliers(options.methods, options.fixed_lrs))
    runs += [s for s in plan if s.key not in {r.key for r in runs}]
    for spec in plan:
        say(f"  {spec.key}  --run-config \"{run_config_string(spec.settings)}\"  "
            f"--federation-config \"{spec.federation}\"")
    total = sum(estimate_seconds(s) for s in runs)
    say(f"{len(runs)} runs; estimate {total / 60:.0f} min on 2 cores; results in {options.root}")


def searched_runs(options: CompareOptions) -> list[RunSpec]:
    """The lr search's first runs (first split and seed), leaving out the methods with a fixed multiplier
    (``--lr-multipliers``) and those that take such a method's rate."""
    fixed = options.fixed_lrs
    methods = [m for m in options.methods if m not in fixed and lr_source(m) not in fixed]
    if not methods:
        return []
    return plan_lr_search(options.settings, methods, options.splits[0], options.tune_seed)


def validation_losses(root: Path, search: Sequence[RunSpec]) -> dict[str, dict[float, float | None]]:
    """``{method: {lr multiplier: final validation loss}}`` of the lr-search runs (``None`` for one not
    finished). The search chooses on the validation split: the test set only reports.

    Raises
    ------
    CompareError
        For a finished run without a validation score (``val-size = 0``).
    """
    from .tables import run_folder

    out: dict[str, dict[float, float | None]] = {}
    for spec in search:
        summary = run_folder(root, spec).summary()
        if summary and summary.get("final-val-loss") is None:
            raise CompareError(f"lr search run {spec.key} has no validation loss: the search chooses on the "
                               "validation split, so give val-size > 0 (e.g. --set val-size=1000)")
        out.setdefault(spec.method, {})[spec.lr_multiplier] = summary["final-val-loss"] if summary else None
    return out


def lr_choices(root: Path, search: Sequence[RunSpec]) -> dict[str, dict[str, Any]]:
    """``{method: {"multiplier", "lr-key", "lr", "search": {multiplier: final validation loss}, "bracketed"}}``
    from finished runs; ``bracketed``: a smaller and a larger rate were tried and did worse."""
    values = {(spec.method, spec.lr_multiplier): spec.settings[spec.lr_key] for spec in search}
    out = {}
    for method, losses in validation_losses(root, search).items():
        try:
            m = choose_lr(losses)
        except ValueError:
            m = 1.0
        tried = sorted(k for k, v in losses.items() if v is not None)
        out[method] = {"multiplier": m, "lr-key": lr_key(method), "lr": values[(method, m)],
                       "search": {f"x{k:g}": v for k, v in losses.items()},
                       "bracketed": bool(tried) and tried[0] < m < tried[-1]}
    return out


def extend_search(root: Path, search: Sequence[RunSpec], settings: Mapping[str, Any], split: str, seed: int,
                  runner: Comparison, report_only: bool = False) -> list[RunSpec]:
    """Runs added to the lr search while a method's best multiplier is at an edge of those tried
    (:func:`~.plan.extend_lr_grid`); with ``report_only``, only those already finished."""
    added: list[RunSpec] = []
    while True:
        losses = validation_losses(root, [*search, *added])
        more = [spec for method, values in losses.items() if (m := extend_lr_grid(values)) is not None
                for spec in plan_lr_search(settings, [method], split, seed, grid=(m,))]
        if report_only:  # a stored run of the extension counts as it did when it ran
            runner.reuse_stored(more)
            more = [spec for spec in more if runner.finished(spec)]
        if not more:
            return added
        if not report_only:
            runner.run_all(more, phase="lr search, extended at the edge")
        added += more


def compare(options: CompareOptions, argv: Sequence[str], say: Callable[[str], None] = print,
            flower_factory=None) -> int:
    """Run the comparison described by ``options``; return the exit code (1 if a run failed)."""
    from .runner import Comparison, machine_info
    from .store import RunStore
    from .tables import (
        MIN_INTERVAL_PAIRS,
        build_rows,
        format_csv,
        format_markdown,
        format_paired_markdown,
        paired_rows,
        run_dir,
        table_notes,
        write_paired_plots,
        write_plots,
    )

    root, settings = options.root, options.settings
    methods, splits, seeds = options.methods, options.splits, options.seeds
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runner = Comparison(root, say=say, flower_factory=flower_factory,
                        reuse=RunStore(options.reuse) if options.reuse else None,
                        store=RunStore(options.store) if options.store else None)
    chosen: dict[str, dict[str, Any]] = {}
    search: list[RunSpec] = []
    try:
        if options.lr_search:
            search = searched_runs(options)
            searched = {s.key for s in search}
            later = sum(estimate_seconds(s) for s in options.plan(chosen_multipliers(methods, options.fixed_lrs))
                        if s.key not in searched and not runner.finished(s))
            if options.report_only:
                runner.reuse_stored(search)
            else:
                runner.run_all(search, phase="lr search", later=later)
            search += extend_search(root, search, settings, splits[0], options.tune_seed, runner,
                                    options.report_only)
            chosen = lr_choices(root, search)
            say("lr search picked: " + ", ".join(f"{m} {c['lr-key']} {c['lr']:g} (x{c['multiplier']:g})"
                                                 for m, c in chosen.items()))
        multipliers = chosen_multipliers(methods, {**{m: c["multiplier"] for m, c in chosen.items()},
                                                   **options.fixed_lrs})
        plan = options.plan(multipliers)
        if options.report_only:
            runner.reuse_stored(plan)
            unfinished = [s.key for s in plan if not runner.finished(s)]
            say(f"report only: {len(plan) - len(unfinished)} of {len(plan)} runs finished"
                + (f"; not yet: {', '.join(unfinished)}" if unfinished else ""))
        else:
            runner.run_all(plan, phase="comparison")
    finally:
        runner.close()
    fixed = options.fixed_lrs
    lrs = {spec.method: spec.settings[spec.lr_key] for spec in plan}
    rows = build_rows(root, plan, options.target)
    notes = table_notes(options)
    dropped = [f"{r['split']}/{r['method']} ({r['dropped_replies']})" for r in rows if r["dropped_replies"]]
    if dropped:
        notes.append("WARNING: client replies were dropped (failed or invalid) in: " + ", ".join(dropped)
                     + "; those rounds aggregated fewer clients (see logs/).")
    if chosen:
        notes.append(f"lr search (final validation loss, tuning seed {options.tune_seed}, split {splits[0]}): "
                     + "; ".join(
            f"{m} " + ", ".join(f"{k} {'' if v is None else f'{v:.4f}'}" for k, v in c["search"].items())
            + f" -> x{c['multiplier']:g} ({'bracketed' if c['bracketed'] else 'NOT bracketed: at the edge'})"
            for m, c in chosen.items()))
    (root / "table.csv").write_text(format_csv(rows))
    markdown = format_markdown(rows, options.target, notes)
    # sa-fedlora against the baselines, then each of its variants against sa-fedlora itself, the app's defaults,
    # fedit-rmax (the byte goal's reference: a variant may meet the goal where the default does not) and fedavg
    # (issue #22's accuracy goal); last, the fixed-rank baseline against fedavg, so that both baselines are on the
    # paired plot. Only references that ran are paired.
    ablations = [m for m in methods if METHODS[m].get("method") == "sa-fedlora" and m != "sa-fedlora"]
    paired = paired_rows(root, plan) + [row for m in ablations for row in paired_rows(
        root, plan, method=m, references=("sa-fedlora", "sa-fp16-rmin4", "fedit-rmax", "fedavg"))]
    paired += [row for m, references in PROTOCOL_PAIRS.items() if m in methods
               for row in paired_rows(root, plan, method=m, references=references)]
    paired += paired_rows(root, plan, method="fedit-rmax", references=("fedavg",))
    if paired:
        markdown += ("\nPaired by seed (same seeds, data and partitions), in accuracy points, with the 95% "
                     f"t-interval of the mean difference (from {MIN_INTERVAL_PAIRS} paired seeds):\n\n"
                     + format_paired_markdown(paired))
    (root / "table.md").write_text(markdown)
    plots = write_plots(root, plan) + write_paired_plots(root, rows, paired)
    failed = [o for o in runner.outcomes.values() if o.status == "failed"]
    comparison = {
        "name": root.name,
        "created": datetime.now().isoformat(timespec="seconds"),
        "command": ["safedlora", *argv],
        "preset": options.preset,
        "settings": {"shared-run-config": dict(settings), "methods": {m: METHODS[m] for m in methods},
                     "method-descriptions": {m: METHOD_DESCRIPTIONS[m] for m in methods},
                     "splits": {s: {"run-config": SPLITS[s][0], "num-supernodes": SPLITS[s][1]} for s in splits},
                     "seeds": list(seeds), "tune-seed": options.tune_seed,
                     "headline-methods": [m for m in HEADLINE if m in methods],
                     "headline-splits": [s for s in splits if s in (options.headline_splits or splits)],
                     "ablation-seeds": list(seeds[:options.ablation_seeds]),
                     "ablation-splits": [s for s in splits if s in (options.ablation_splits or splits)],
                     "target-accuracy": options.target, "lr-search": options.lr_search,
                     "lr-grid": list(LR_GRID) if options.lr_search else [],
                     "lr-grid-extension-limit": LR_EXTENSION_LIMIT if options.lr_search else None,
                     "federation-config": FEDERATION},
        "chosen-lrs": {m: {"multiplier": multipliers[m], "lr-key": lr_key(m), "lr": lrs.get(m),
                           "search": (chosen.get(m) or chosen.get(lr_source(m), {})).get("search", {}),
                           "bracketed": (chosen.get(m) or chosen.get(lr_source(m), {})).get("bracketed"),
                           "fixed": m in fixed or lr_source(m) in fixed} for m in methods},
        "machine": machine_info(),
        "wall-seconds": time.perf_counter() - started,
        "runs": [{"key": o.spec.key, "split": o.spec.split, "method": o.spec.method, "seed": o.spec.seed,
                  "lr-multiplier": o.spec.lr_multiplier, "status": o.status, "seconds": o.seconds,
                  "estimate-seconds": estimate_seconds(o.spec), "error": o.error,
                  "run-dir": str(run_dir(root, o.spec)),
                  "run-config": run_config_string(runner.settings_with_output(o.spec)),
                  "federation-config": o.spec.federation, "command": o.command}
                 for o in runner.outcomes.values()],
        "rows": rows,
        "paired": paired,
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


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (``kill``, a scheduler, a container stop) into ``KeyboardInterrupt`` while inside.

    The comparison then stops its running ``flwr run`` and its SuperLink (``Comparison.close``) as on
    Ctrl-C, instead of leaving them and their Ray workers running. (A job started in the background by a
    non-interactive shell ignores SIGINT, so ``kill`` is how it is stopped.)
    """
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def compare_causal_lm(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``--task causal-lm`` (:mod:`.lm`): refuses the options that only the text-classification comparison reads,
    and checks every run's run-config before the first run starts."""
    from safedlora_app.core.config import ConfigError, RunConfig
    from safedlora_app.tools.simulation import APP_ROOT

    from .lm import LM_ARMS, compare_lm, lm_seeds, lm_settings

    defaults = build_parser().parse_args(["compare"])
    ignored = [f"--{key.replace('_', '-')}" for key, value in vars(args).items()
               if key not in LM_OPTIONS and value != getattr(defaults, key)]
    if ignored:
        flags = {"methods": "arms"}  # the dest of --arms keeps the option's older name
        allowed = ", ".join(sorted("--" + flags.get(k, k).replace("_", "-") for k in LM_OPTIONS - {"command", "task"}))
        parser.exit(2, f"safedlora compare: error: {', '.join(ignored)}: not allowed with --task causal-lm; "
                       f"allowed: {allowed}\n")
    arms = args.methods or LM_ARMS
    if unknown := [a for a in arms if a not in LM_ARMS]:
        parser.exit(2, f"safedlora compare: error: --arms {','.join(unknown)}: not allowed with --task causal-lm; "
                       f"choose from: {', '.join(LM_ARMS)}\n")
    try:
        settings = parse_set(args.set)
    except CompareError as error:
        parser.exit(2, f"safedlora compare: error: {error}\n")
    name = args.name or "causal-lm"
    if "/" in name or name in (".", "..") or name.startswith("-"):
        parser.exit(2, f"safedlora compare: error: --name = {name!r} is not allowed; it must be a plain directory "
                       "name, e.g. 'causal-lm'\n")
    out = Path(os.path.expanduser(args.out)).resolve() / name
    if not args.report_only and packaged_with_app(out, APP_ROOT):
        parser.exit(2, f"safedlora compare: error: --out/--name = {out} is not allowed: it lies inside the app "
                       f"directory {APP_ROOT}, so `flwr run` would pack the results into the app bundle\n")
    seeds = lm_seeds(args.seeds or 3)
    for arm in arms:
        try:
            RunConfig.from_mapping(lm_settings(arm, seeds[0], out / "runs", settings))
        except ConfigError as error:
            parser.exit(2, f"safedlora compare: error: {arm}: {error}\n")
    with sigterm_as_interrupt():
        try:
            return compare_lm(out, seeds, settings, args.report_only,
                              lambda line: print(line, flush=True), arms)
        except KeyboardInterrupt:
            print("interrupted; run the same command again to resume (finished runs are skipped)", flush=True)
            return 130


def main(argv: Sequence[str] | None = None) -> int:
    """``safedlora`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(parser, args, argv)
    except ModuleNotFoundError as error:
        if error.name not in LAB_DEPENDENCIES:
            raise
        parser.exit(2, f"safedlora compare: error: {error.name} is missing: the lab needs its extra "
                       f"(pip install -c constraints.txt -e \".[lab]\" in the app's checkout)\n")


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.task == "causal-lm":
        return compare_causal_lm(parser, args)
    try:
        options = resolve_options(args)
    except CompareError as error:
        parser.exit(2, f"safedlora compare: error: {error}\n")
    say = lambda line: print(line, flush=True)  # noqa: E731
    if options.dry_run:
        print_plan(options, say)
        return 0
    try:
        with sigterm_as_interrupt():
            return compare(options, argv, say)
    except CompareError as error:
        parser.exit(2, f"safedlora compare: error: {error}\n")
    except KeyboardInterrupt:
        say("interrupted; run the same command again to resume (finished runs are skipped)")
        return 130
