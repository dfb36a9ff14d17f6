"""The small-dataset check of issue #10: a user's own CSV of 1,000 real rows, 3 classes, 2 label-skewed clients.

    python scripts/small_dataset_check.py --out /tmp/small-check        # fedit and sa-fedlora, seeds 42-44

Builds ``small.csv`` from 1,000 tweets of the embedded corpus (seeded draw; columns ``text`` and ``label``
as class names), then runs each method and seed through ``flwr run`` with 2 simulated SuperNodes, Dirichlet
label skew (the default partitioner), 10 rounds and the app's defaults otherwise. ``test-size`` is 200: the
default 1,000 would leave no training rows. Prints the class counts (the held-out split is stratified, so
the majority class's share is the same there) and, per run, round 0's accuracy, the final and last-3
accuracy and the final macro-F1; ``results.json`` keeps every run's accuracy by round. Finished runs are
kept and skipped when the command is run again.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from collections import Counter
from pathlib import Path

from safedlora_app.core.data import SENTIMENTS, load_default_tweets
from safedlora_app.tools.simulation import LocalFlower

ROWS, TEST_SIZE, ROUNDS, SEEDS, METHODS = 1000, 200, 10, (42, 43, 44), ("fedit", "sa-fedlora")


def write_csv(path: Path, seed: int = 0) -> list[str]:
    """1,000 tweets drawn at random (seeded) as ``text,label``; returns their labels."""
    tweets = load_default_tweets().shuffle(seed=seed).select(range(ROWS))
    labels = [SENTIMENTS[i] for i in tweets["label"]]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(tweets["text"], labels))
    return labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the CSV, the runs and results.json")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    labels = write_csv(out / "small.csv")
    print(f"small.csv: {ROWS} rows, classes {dict(Counter(labels))}")
    flower = LocalFlower(Path(tempfile.mkdtemp(prefix="small-check-flwr-")))
    results = []
    try:
        for method in METHODS:
            for seed in SEEDS:
                name = f"{method}-s{seed}"
                run_dir = out / "runs" / name
                if not (run_dir / "summary.json").exists():
                    resume = (run_dir / "checkpoint" / "state.json").exists()  # an interrupted run continues
                    config = (f"dataset-name='{out / 'small.csv'}' test-size={TEST_SIZE} num-server-rounds={ROUNDS} "
                              f"method='{method}' seed={seed} out-dir='{out / 'runs'}' run-name='{name}' "
                              f"cache-dir='{out / 'cache'}' resume={'true' if resume else 'false'}")
                    result = flower.run(config, timeout=1800, federation="num-supernodes=2")
                    status = flower.run_status(result.stdout + result.stderr)
                    if status != "finished:completed":
                        print(f"{name}: {status}\n{(result.stdout + result.stderr)[-3000:]}")
                        return 1
                rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                accuracies = [r["accuracy"] for r in rows]
                summary = json.loads((run_dir / "summary.json").read_text())
                results.append({"method": method, "seed": seed, "round0": accuracies[0], "final": accuracies[-1],
                                "last3": sum(accuracies[-3:]) / 3, "macro-f1": summary["final-macro-f1"],
                                "accuracy-by-round": accuracies})
                print(f"{name}: round 0 {accuracies[0]:.1%} | final {accuracies[-1]:.1%} | "
                      f"last 3 {results[-1]['last3']:.1%} | macro-F1 {summary['final-macro-f1']:.3f}", flush=True)
    finally:
        flower.stop()
    test_labels = json.loads((out / "runs" / f"{METHODS[0]}-s{SEEDS[0]}" / "config.json").read_text())
    (out / "results.json").write_text(json.dumps({"label-names": test_labels["label-names"], "runs": results},
                                                 indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
