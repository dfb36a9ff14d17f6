"""Pilot for stable training: run a few training settings through `flwr run`, then show how smoothly each learns.

    python bench/stability_pilot.py OUT_DIR --setting default|natural --run NAME "RUN-CONFIG" [--run ...]
    python bench/stability_pilot.py OUT_DIR --report          # the table of every finished run in OUT_DIR

``default`` is the quickstart's federation (2 supernodes, Dirichlet 0.5, the run config's defaults);
``natural`` is the comparison's (7 supernodes, one topic each, every client every round). Finished runs are
skipped, so an interrupted pilot resumes. The report gives, per run: final accuracy, the mean and the spread
(max - min) of the last 4 rounds, and how often the global test loss went up from one round to the next.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from safedlora_app.core.run_folder import SUMMARY_FILE, RunFolder
from safedlora_app.tools.simulation import LocalFlower

SETTINGS = {
    "default": ("", ""),
    "natural": ("partitioner='natural' min-nodes=7 fraction-train=1.0", "num-supernodes=7"),
}


def report(out: Path) -> None:
    print("| run | final acc % | last-4 mean % | last-4 spread (points) | loss rises | loss by round |")
    print("|---|---|---|---|---|---|")
    for summary in sorted(out.glob(f"runs/*/{SUMMARY_FILE}")):
        rows = RunFolder(summary.parent).records()
        evaluated = [r for r in rows if r["accuracy"] is not None]
        last4 = [r["accuracy"] for r in evaluated[-4:]]
        losses = [r["loss"] for r in evaluated]
        rises = sum(b > a for a, b in zip(losses, losses[1:]))
        print(f"| {summary.parent.name} | {100 * last4[-1]:.1f} | {100 * statistics.mean(last4):.1f} | "
              f"{100 * (max(last4) - min(last4)):.1f} | {rises} of {len(losses) - 1} | "
              f"{' '.join(f'{x:.2f}' for x in losses)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    parser.add_argument("--run", nargs=2, action="append", default=[], metavar=("NAME", "RUN_CONFIG"))
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if not args.report:
        run_config, federation = SETTINGS[args.setting]
        (args.out / "flwr-home").mkdir(parents=True, exist_ok=True)
        flower = LocalFlower(args.out / "flwr-home")
        try:
            for name, settings in args.run:
                if RunFolder(args.out / "runs" / name).finished:
                    continue
                result = flower.run(f"{run_config} {settings} out-dir='{args.out / 'runs'}' run-name='{name}' "
                                    f"cache-dir='{args.out / 'cache'}'", timeout=3600, federation=federation)
                status = flower.run_status(result.stdout + result.stderr)
                print(f"{name}: {status}", flush=True)
        finally:
            flower.stop()
    report(args.out)


if __name__ == "__main__":
    main()
