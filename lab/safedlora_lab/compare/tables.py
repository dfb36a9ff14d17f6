"""Aggregation and formatting of finished runs: table rows, CSV, Markdown, notes and plots.

Reads what the app wrote in each run directory (``metrics.jsonl``, ``summary.json``); nothing here runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from safedlora_app.core.run_folder import RunFolder
from safedlora_app.server.outputs import run_totals

from .plan import HEADLINE, METHODS, REFERENCES, SPLITS, USER_NAMES, CompareOptions, RunSpec, clients_per_round

MB = 1e6
#: Fewest paired seeds with a confidence interval. Two differences that happen to be equal have sd 0 and would
#: give a zero-width interval ("[-0.3, -0.3]"): two pairs say nothing about the spread.
MIN_INTERVAL_PAIRS = 3


# --- Aggregation (pure) ----------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is ``None`` for fewer than two values.

    Examples
    --------
    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float] | None:
    """Mean of paired differences and its Student-t confidence interval; ``None`` for fewer than
    ``MIN_INTERVAL_PAIRS`` pairs.

    Examples
    --------
    >>> [round(x, 4) for x in paired_interval([1.0, 2.0, 3.0])]
    [2.0, -0.4841, 4.4841]
    """
    from scipy import stats

    values = [float(v) for v in differences]
    if len(values) < MIN_INTERVAL_PAIRS:
        return None
    mean = statistics.fmean(values)
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def mb_to_target(records: Sequence[Mapping], target: float) -> float | None:
    """Cumulative MB sent when central accuracy first reaches ``target``; ``None`` if it never does."""
    for record in records:
        if record.get("accuracy") is not None and record["accuracy"] >= target:
            return record["cumulative-bytes"] / MB
    return None


def accuracy_at_mb(records: Sequence[Mapping], mb: float) -> float | None:
    """Accuracy of the last evaluated trained round whose cumulative bytes stay within ``mb``.

    ``None`` when not even the first round fits (fedavg's first round sends more than a LoRA run's total):
    the untrained initial model is no answer to "how good at equal bytes".
    """
    within = [r for r in records if r["round"] > 0 and r.get("accuracy") is not None
              and r["cumulative-bytes"] / MB <= mb + 1e-9]
    return within[-1]["accuracy"] if within else None


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


def paired_rows(root: Path, plan: Sequence[RunSpec], method: str = "sa-fedlora",
                references: Sequence[str] = REFERENCES) -> list[dict[str, Any]]:
    """``method`` minus each reference, paired by seed on each split: final and last-3 accuracy (points).

    Only seeds where both runs finished are paired. ``low``/``high`` bound the 95% t-interval of the mean
    paired difference (``None`` with fewer than ``MIN_INTERVAL_PAIRS`` pairs).
    """
    finished: dict[tuple[str, str, int], list[dict]] = {}
    for spec in plan:
        if (folder := run_folder(root, spec)).finished:
            finished[(spec.split, spec.method, spec.seed)] = folder.records()
    rows = []
    for split in dict.fromkeys(s.split for s in plan):
        for reference in references:
            seeds = sorted(seed for (sp, m, seed) in finished if sp == split and m == method
                           and (split, reference, seed) in finished)
            if not seeds or reference == method:
                continue
            row: dict[str, Any] = {"split": split, "method": method, "reference": reference, "pairs": len(seeds)}
            for column, key in (("final", "final-accuracy"), ("last3", "last3-accuracy")):
                diffs = [100 * (run_totals(finished[(split, method, s)])[key]
                                - run_totals(finished[(split, reference, s)])[key]) for s in seeds]
                interval = paired_interval(diffs)
                row[f"{column}_diffs"] = diffs
                row[f"{column}_mean"] = statistics.fmean(diffs)
                row[f"{column}_low"], row[f"{column}_high"] = interval[1:] if interval else (None, None)
            rows.append(row)
    return rows


def format_paired_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The paired differences as a Markdown table (points; 95% t-interval from ``MIN_INTERVAL_PAIRS`` pairs)."""
    def cell(row, column):
        low, high = row[f"{column}_low"], row[f"{column}_high"]
        if low is None:
            interval = f" (n={row['pairs']}: no interval below {MIN_INTERVAL_PAIRS} seeds)"
        else:
            interval = f" [{low:+.1f}, {high:+.1f}]"
        return f"{row[f'{column}_mean']:+.1f}{interval}"

    lines = ["| split | difference | seeds | final acc, points [95% CI] | last-3 acc, points [95% CI] "
             "| per seed (final) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['split']} | {r['method']} − {r['reference']} | {r['pairs']} | {cell(r, 'final')} | "
                     f"{cell(r, 'last3')} | {', '.join(f'{d:+.1f}' for d in r['final_diffs'])} |")
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> float | int | None:
    """An integral float as int (byte counts that are the same for every seed stay exact)."""
    if value is not None and float(value).is_integer():
        return int(value)
    return value


def method_row(split: str, method: str, runs: Sequence[tuple[Mapping, Sequence[Mapping]]], target: float,
               lr: tuple[str, float, float], seeds_planned: int, equal_mb: float | None = None) -> dict[str, Any]:
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
    equal_mb : float, optional
        MB at which to read every method's accuracy (fedit-rmax's total on the split).

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
                        ("selected_accuracy", "selected-accuracy"), ("last3_accuracy", "last3-accuracy"),
                        ("final_macro_f1", "final-macro-f1")):
        row[f"{column}_mean"], row[f"{column}_std"] = mean_std([t[key] for t in totals])
    reached = [rounds_to_target(records, target) for _, records in runs]
    hits = [r for r in reached if r is not None]
    row["rounds_to_target"] = mean_std(hits)[0] if runs and len(hits) == len(runs) else None
    row["reached_target"] = f"{len(hits)}/{len(runs)}"
    to_target = [mb_to_target(records, target) for _, records in runs]
    row["mb_to_target"] = mean_std(to_target)[0] if runs and None not in to_target else None
    at_mb = [accuracy_at_mb(records, equal_mb) for _, records in runs] if equal_mb is not None else []
    row["equal_mb"] = equal_mb
    row["accuracy_at_equal_mb"] = mean_std(at_mb)[0] if at_mb and None not in at_mb else None
    for column, key in (("bytes_down", "bytes-down"), ("bytes_up", "bytes-up")):
        row[column] = _number(mean_std([t[key] for t in totals])[0])
    row["mb_down"] = row["bytes_down"] / MB if row["bytes_down"] is not None else None
    row["mb_up"] = row["bytes_up"] / MB if row["bytes_up"] is not None else None
    row["params_sent"] = _number(mean_std([t["params-down"] + t["params-up"] for t in totals])[0])
    row["saving_vs_fedavg_pct"] = row["saving_vs_fedit_rmax_pct"] = None
    row["wall_seconds"] = mean_std([s.get("wall-seconds") for s, _ in runs])[0]
    row["dropped_replies"] = sum(t["dropped-replies"] for t in totals)
    return row


def add_savings(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``saving_vs_fedavg_pct`` and ``saving_vs_fedit_rmax_pct`` from the same split's reference rows, and
    ``params_pct_of_fedavg`` (the paper's metric: transmitted parameters as a share of fedavg's).

    The saving compares total bytes (down + up): ``100 * (1 - bytes / bytes_reference)``.
    """
    params = {(r["split"], r["method"]): r["params_sent"] for r in rows}
    totals = {(r["split"], r["method"]): (r["bytes_down"] + r["bytes_up"]) if r["bytes_down"] is not None else None
              for r in rows}
    out = []
    for row in rows:
        row = dict(row)
        mine = totals[(row["split"], row["method"])]
        for reference, column in zip(REFERENCES, ("saving_vs_fedavg_pct", "saving_vs_fedit_rmax_pct"), strict=True):
            row[column] = saving_pct(mine, totals.get((row["split"], reference)))
        fedavg = params.get((row["split"], REFERENCES[0]))
        row["params_pct_of_fedavg"] = (100.0 * row["params_sent"] / fedavg if fedavg and row["params_sent"] is not None
                                       else None)
        out.append(row)
    return out


CSV_COLUMNS = ("split", "method", "seeds", "seeds_planned", "lr_key", "lr", "lr_multiplier",
               "final_accuracy_mean", "final_accuracy_std", "best_accuracy_mean", "best_accuracy_std",
               "selected_accuracy_mean", "selected_accuracy_std", "last3_accuracy_mean", "last3_accuracy_std",
               "final_macro_f1_mean", "final_macro_f1_std", "rounds_to_target", "reached_target", "mb_to_target",
               "equal_mb", "accuracy_at_equal_mb",
               "bytes_down", "bytes_up", "mb_down", "mb_up", "params_sent", "params_pct_of_fedavg",
               "saving_vs_fedavg_pct", "saving_vs_fedit_rmax_pct", "wall_seconds", "dropped_replies")


def format_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV with ``CSV_COLUMNS`` (empty cells for missing values; whole numbers stay whole)."""
    frame = pd.DataFrame(list(rows), columns=list(CSV_COLUMNS), dtype=object)
    return frame.where(frame.notna(), "").to_csv(index=False, lineterminator="\n")


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
    header = ("split", "method", "seeds", "lr", "final acc %", "best acc % (oracle)", "val-selected acc %",
              "last-3 acc %", "macro-F1",
              f"rounds to {target:.0%}", f"MB to {target:.0%}", "acc % at fedit-rmax's MB", "MB down", "MB up",
              "params sent", "params % of fedavg's", "saving vs fedavg", "saving vs fedit-rmax", "wall s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        seeds = f"{r['seeds']}" + ("" if r["seeds"] == r["seeds_planned"] else f" of {r['seeds_planned']}")
        if r["seeds_planned"] < max(o["seeds_planned"] for o in rows):
            seeds += "*"
        rtt = format_rounds_to_target(r["rounds_to_target"], r["reached_target"])
        cells = (
            r["split"], r["method"], seeds, f"{r['lr_key']} {r['lr']:g} (x{r['lr_multiplier']:g})",
            format_pm(r["final_accuracy_mean"], r["final_accuracy_std"]),
            format_pm(r["best_accuracy_mean"], r["best_accuracy_std"]),
            format_pm(r["selected_accuracy_mean"], r["selected_accuracy_std"]),
            format_pm(r["last3_accuracy_mean"], r["last3_accuracy_std"]),
            format_pm(r["final_macro_f1_mean"], r["final_macro_f1_std"], scale=1.0, digits=3),
            rtt,
            "" if r.get("mb_to_target") is None else f"{r['mb_to_target']:.2f}",
            "" if r.get("accuracy_at_equal_mb") is None else f"{100 * r['accuracy_at_equal_mb']:.1f}",
            "" if r["mb_down"] is None else f"{r['mb_down']:.2f}",
            "" if r["mb_up"] is None else f"{r['mb_up']:.2f}",
            "" if r["params_sent"] is None else f"{r['params_sent'] / 1e6:.2f} M",
            "" if r.get("params_pct_of_fedavg") is None else f"{r['params_pct_of_fedavg']:.2f}",
            format_saving(r["saving_vs_fedavg_pct"]),
            format_saving(r["saving_vs_fedit_rmax_pct"]),
            "" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}",
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines + [""] + [f"{note}  " for note in notes]) + "\n"


# --- Reading run directories -------------------------------------------------------------------
def run_dir(root: Path, spec: RunSpec) -> Path:
    """``<root>/runs/<split>/<run-name>``: where the app writes one planned run."""
    return root / "runs" / spec.split / spec.run_name


def run_folder(root: Path, spec: RunSpec) -> RunFolder:
    """The app's files of one planned run."""
    return RunFolder(run_dir(root, spec))


# --- Reporting ---------------------------------------------------------------------------------------
def build_rows(root: Path, plan: Sequence[RunSpec], target: float) -> list[dict[str, Any]]:
    """Aggregate the finished runs of ``plan`` into table rows (split, then method order of the plan)."""
    groups: dict[tuple[str, str], list[RunSpec]] = {}
    for spec in plan:
        groups.setdefault((spec.split, spec.method), []).append(spec)
    finished = {}
    for key, specs in groups.items():
        finished[key] = [(summary, folder.records()) for spec in specs
                         if (summary := (folder := run_folder(root, spec)).summary()) is not None]
    rows = []
    for (split, method), specs in groups.items():
        reference = finished.get((split, REFERENCES[1]), [])
        equal_mb = mean_std([records[-1]["cumulative-bytes"] / MB for _, records in reference])[0]
        first = specs[0]
        lr = (first.lr_key, first.settings[first.lr_key], first.lr_multiplier)
        rows.append(method_row(split, method, finished[(split, method)], target, lr, len(specs), equal_mb))
    return add_savings(rows)


def write_plots(root: Path, plan: Sequence[RunSpec]) -> list[Path]:
    """Per split: all methods' first seed on one chart (accuracy vs round / vs MB, budget), sa-fedlora's ranks."""
    from safedlora_app.server.plots import plot_ranks, plot_runs

    paths = []
    for split in dict.fromkeys(s.split for s in plan):
        runs: dict[str, list[dict]] = {}
        for spec in plan:
            if spec.split == split and spec.method not in runs and (folder := run_folder(root, spec)).finished:
                runs[spec.method] = folder.records()
        if not runs:
            continue
        out = root / "plots" / split
        paths += plot_runs(runs, out)
        if "sa-fedlora" in runs:
            ranks = plot_ranks(runs["sa-fedlora"], out / "sa-fedlora_ranks_vs_round.png")
            paths += [ranks] if ranks else []
    return paths


def write_paired_plots(root: Path, rows: Sequence[Mapping[str, Any]], paired: Sequence[Mapping[str, Any]],
                       reference: str = "fedavg") -> list[Path]:
    """Per split with ``reference`` runs: every method paired against it, against the MB it sent."""
    from safedlora_app.server.plots import plot_paired

    paths = []
    for split in dict.fromkeys(r["split"] for r in rows):
        points = paired_points(rows, paired, split, reference)
        if len(points) > 1:
            paths.append(plot_paired(points, reference, root / "plots" / split / f"paired_vs_{reference}_vs_mb.png"))
    return paths


def paired_points(rows: Sequence[Mapping[str, Any]], paired: Sequence[Mapping[str, Any]], split: str,
                  reference: str) -> list[tuple[str, float, float, float | None, float | None]]:
    """The paired plot's points on one split: ``(label, MB sent, mean difference, low, high)``, the reference
    first at 0; empty without the reference's runs. Labels add the name a user knows a method by."""
    mb = {r["method"]: (r["bytes_down"] + r["bytes_up"]) / MB for r in rows
          if r["split"] == split and r["bytes_down"] is not None}
    if reference not in mb:
        return []

    def label(method: str, suffix: str = "") -> str:
        return method + (f": {USER_NAMES[method]}" if method in USER_NAMES else "") + suffix

    return [(label(reference), mb[reference], 0.0, None, None)] + [
        (label(r["method"], f" ({r['pairs']} seed{'s' if r['pairs'] > 1 else ''})"), mb[r["method"]],
         r["final_mean"], r["final_low"], r["final_high"])
        for r in paired if r["split"] == split and r["reference"] == reference and r["method"] in mb]


def table_notes(options: CompareOptions) -> list[str]:
    """The lines under the Markdown table."""
    from safedlora_app.core.config import RunConfig

    s, seeds = options.settings, options.seeds
    every = int(s.get("eval-every", RunConfig().eval_every))
    nodes = ", ".join(f"{split} {clients_per_round(s, SPLITS[split][1])} of {SPLITS[split][1]}"
                      for split in options.splits)
    notes = [
        f"Same for every method: seeds {', '.join(map(str, seeds))}; {s['num-server-rounds']} rounds; clients per "
        f"round: {nodes}; {s['local-samples']} samples x {s['local-epochs']} epoch(s) per client and round; "
        f"central evaluation on {s['test-size']} test rows and {s.get('val-size', 0)} validation rows"
        + (f"; rank-max {s['rank-max']}, rank-min {s['rank-min']}." if {"rank-max", "rank-min"} <= set(s) else
           "; each method's own ranks (its keys, its profile's or the app's defaults)."),
        "Accuracy: mean ± sample std over seeds where several; best (oracle) = best test accuracy over the evaluated "
        "rounds 1..T, a choice made on the test set, shown only as an upper bound; val-selected = test accuracy at "
        "the round of lowest validation loss; last-3 = mean of the last 3 rounds; macro-F1 of the final round. "
        + (f"Rounds and MB to the target are read at the evaluated rounds (every {every}th and the "
           "last 3), so the target was crossed at most that many rounds earlier. " if every > 1 else "")
        + "Accuracy at fedit-rmax's MB: the last evaluated round within that many MB (empty if none). "
        "Bytes: all ArrayRecords sent down and up, all clients, all rounds (mean over seeds). "
        "Saving = 1 - bytes / bytes of the reference on the same split.",
        "wall s = the ServerApp's time from round 0's evaluation to the end (summary.json), without `flwr run` "
        "startup. Plots show each method's first seed.",
    ]
    own = [f"{m} {METHODS[m]['num-server-rounds']}" for m in options.methods if "num-server-rounds" in METHODS[m]]
    if own:
        notes.append("Rounds of the methods that set their own: " + ", ".join(own) + ".")
    ablation_seeds = ", ".join(map(str, seeds[:options.ablation_seeds]))
    others = [m for m in options.methods if m not in HEADLINE]
    if len(seeds) > 1 and others:
        where = options.ablation_splits
        notes.append(f"* methods other than {', '.join(HEADLINE)}: seed(s) {ablation_seeds}"
                     + (f", split(s) {', '.join(where)}" if where else "") + ".")
    headline = [m for m in HEADLINE if m in options.methods]
    outside = [split for split in options.splits if split not in (options.headline_splits or options.splits)]
    if headline and outside and options.ablation_seeds < len(seeds):
        notes.append(f"* {', '.join(headline)} on split(s) {', '.join(outside)}: seed(s) {ablation_seeds}.")
    return notes
