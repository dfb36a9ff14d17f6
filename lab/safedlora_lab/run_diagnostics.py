"""Per-round diagnostics of a comparison's runs, as Markdown: what docs/comparison.md's diagnosis quotes.

    python -m safedlora_lab.run_diagnostics results/full --split natural --seed 42

For each finished run of that split and seed (one row per method, at the lr the comparison used): the global
test loss at the evaluated rounds, the clients' mean training loss, the share of each round's new update that
truncation to the budget dropped (``dropped-update``), how far the first local step moved A
(``first-step-a-ratio``), and the Frobenius norms of one module's factors (``factor-norms``), all from the
run's ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from safedlora_app.core.run_folder import RunFolder
from safedlora_lab.compare.plan import RunSpec

SERIES = {
    "test loss (evaluated rounds)": "loss",
    "train loss": "train-loss",
    "dropped update, %": "dropped-update",
    "first step ‖δA‖/‖A‖, %": "first-step-a-ratio",
    "‖B‖": "norm-B",
    "‖A‖": "norm-A",
}
PERCENT = {"dropped-update", "first-step-a-ratio"}


def load_run(run_dir: Path) -> pd.DataFrame:
    """One row per round of ``metrics.jsonl``, with the factor norms as columns ``norm-B`` and ``norm-A``."""
    frame = pd.DataFrame(RunFolder(run_dir).records()).set_index("round")
    norms = frame["factor-norms"].apply(lambda n: n if isinstance(n, dict) else {})
    frame["norm-B"], frame["norm-A"] = norms.map(lambda n: n.get("B")), norms.map(lambda n: n.get("A"))
    return frame


def series(frame: pd.DataFrame, column: str) -> str:
    """The column's values over rounds 1..T (round 0 too for the test loss), blanks dropped."""
    if column not in frame:  # metrics.jsonl of a version that did not record it
        return "–"
    values = frame[column] if column == "loss" else frame[column].drop(index=0, errors="ignore")
    values = values.dropna()
    scale, digits = (100.0, 1) if column in PERCENT else (1.0, 3 if column != "train-loss" else 2)
    return " ".join(f"{v * scale:.{digits}f}" for v in values) or "–"


def chosen_runs(results: Path, split: str, seed: int) -> dict[str, Path]:
    """``{method: run dir}`` of the finished runs of ``split`` and ``seed``, each at the lr multiplier the
    comparison used for it (``comparison.json``'s rows; run names as :class:`RunSpec` makes them)."""
    rows = json.loads((results / "comparison.json").read_text())["rows"]
    runs = {}
    for row in rows:
        if row["split"] == split:
            spec = RunSpec(split, row["method"], seed, float(row["lr_multiplier"]), {})
            if RunFolder(results / "runs" / split / spec.run_name).finished:
                runs[row["method"]] = results / "runs" / split / spec.run_name
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a comparison's directory (holds comparison.json and runs/)")
    parser.add_argument("--split", default="natural", help="default: natural")
    parser.add_argument("--seed", type=int, default=42, help="default: 42")
    args = parser.parse_args(argv)
    if not (args.results / "comparison.json").is_file():
        print(f"{args.results / 'comparison.json'} does not exist; give a comparison's directory "
              "(safedlora compare --report-only writes comparison.json)", file=sys.stderr)
        return 2
    runs = chosen_runs(args.results, args.split, args.seed)
    if not runs:
        print(f"no finished run of split {args.split!r} with seed {args.seed} in {args.results}", file=sys.stderr)
        return 2
    print(f"Split {args.split}, seed {args.seed}; runs: {', '.join(d.name for d in runs.values())}.\n")
    frames = {method: load_run(run_dir) for method, run_dir in runs.items()}
    for title, column in SERIES.items():
        print(f"| method | {title} |\n|---|---|")
        for method, frame in frames.items():
            print(f"| {method} | {series(frame, column)} |")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
