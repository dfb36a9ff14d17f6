"""Small-dataset checks: a user's own CSV of 1,000 real rows, 3 classes, 2 nodes.

    python -m safedlora_lab.small_dataset_check --out /tmp/small-check                  # issue #10's check
    python -m safedlora_lab.small_dataset_check --data skewed --out /tmp/skewed-check   # issue #22's, every variant

Two datasets, both drawn (seeded) from the embedded tweets and written as ``text,label[,site]``:

- ``random`` (issue #10): 1,000 tweets at random (majority class 42%), Dirichlet label skew (the default
  partitioner), 10 rounds.
- ``skewed`` (issue #22 §6): 650 negative, 200 neutral and 150 positive tweets (majority 65%), split into two
  sites with very different label mixes (``site`` column, ``partitioner='natural'``): negatives half and half,
  85% of the neutral ones at site ``a`` and 85% of the positive ones at site ``b``. The default 12 rounds.

``test-size`` is 200 and ``val-size`` 100 (both stratified, so the majority's share is the same there): the
defaults (1,000 and 500) would leave no training rows. The lowest-loss round is chosen on the validation rows.
Each variant is a run-config fragment (``VARIANTS``) added to the dataset's settings; each run is
``flwr run`` with 2 simulated SuperNodes. Prints the class counts and, per run, the final, best and last-3
accuracy, the final macro-F1 and the round of the lowest held-out loss; ``results.json`` keeps every run's
accuracy, macro-F1 and loss by round, of this invocation and of earlier ones into the same ``--out``.
Finished runs are kept and skipped when the command is run again, and an interrupted one resumes from its
checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import json
import operator
import random
import tempfile
from collections import Counter
from pathlib import Path

from safedlora_app.core.data import SENTIMENTS, load_default_tweets
from safedlora_app.core.run_folder import RunFolder
from safedlora_app.tools.simulation import LocalFlower

TEST_SIZE, VAL_SIZE = 200, 100
#: Per dataset: the run config every run shares, and the variants run by default.
DATASETS = {
    "random": {"config": "num-server-rounds=10", "variants": ("defaults",)},
    "skewed": {"config": "partitioner='natural' natural-column='site'",
               "variants": ("whole-share", "whole-share-prox", "fewer-steps")},
}
#: What each variant adds to the defaults (issue #22 §6: ways to damp client drift on a small, skewed set).
VARIANTS = {
    "defaults": "",
    # The README's advice before issue #22: each node trains on its whole share (~400 rows: 25 steps a round).
    "whole-share": "local-samples=0",
    # The same with the proximal term kept on through the annealing stage.
    "whole-share-prox": "local-samples=0 prox-mu-anneal=0.1",
    # Fewer local steps: 160 rows (10 steps) a round, so a node drifts less from the global model.
    "fewer-steps": "local-samples=160",
}
#: The skewed set's class counts and each class's share at site ``a`` (the rest are at site ``b``).
SKEWED_COUNTS = {"negative": 650, "neutral": 200, "positive": 150}
SKEWED_SITE_A = {"negative": 0.5, "neutral": 0.85, "positive": 0.15}


def write_random_csv(path: Path, seed: int = 0, rows: int = 1000) -> list[str]:
    """``rows`` tweets drawn at random (seeded) as ``text,label``; returns their labels."""
    tweets = load_default_tweets().shuffle(seed=seed).select(range(rows))
    labels = [SENTIMENTS[i] for i in tweets["label"]]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(tweets["text"], labels))
    return labels


def write_skewed_csv(path: Path, seed: int = 0) -> list[tuple[str, str]]:
    """The skewed set as ``text,label,site``; returns each row's ``(label, site)``."""
    tweets = load_default_tweets().shuffle(seed=seed)
    rng = random.Random(seed)
    rows, wanted = [], dict(SKEWED_COUNTS)
    for text, label_id in zip(tweets["text"], tweets["label"]):
        label = SENTIMENTS[label_id]
        if wanted[label]:
            wanted[label] -= 1
            rows.append((text, label, "a" if rng.random() < SKEWED_SITE_A[label] else "b"))
        if not any(wanted.values()):
            break
    rng.shuffle(rows)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "site"])
        writer.writerows(rows)
    return [(label, site) for _, label, site in rows]


def summarise(run_dir: Path) -> dict:
    """One run's accuracy, macro-F1 and held-out loss by round, and the figures the check prints."""
    folder = RunFolder(run_dir)
    rows = [r for r in folder.records() if r.get("accuracy") is not None]
    summary = folder.summary()
    accuracy = [r["accuracy"] for r in rows]
    loss = [r["loss"] for r in rows]
    return {"final": accuracy[-1], "best": max(accuracy[1:]), "last3": sum(accuracy[-3:]) / 3,
            "macro-f1": summary["final-macro-f1"], "lowest-loss-round": min(rows[1:], key=lambda r: r["loss"])["round"],
            "best-model-round": summary.get("best-model-round"),
            "accuracy-by-round": accuracy, "macro-f1-by-round": [r["macro-f1"] for r in rows], "loss-by-round": loss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the CSV, the runs and results.json")
    parser.add_argument("--data", choices=sorted(DATASETS), default="random", help="which small dataset")
    parser.add_argument("--methods", default="fedit,sa-fedlora", help="comma-separated methods")
    parser.add_argument("--variants", default="", help=f"comma-separated, of {', '.join(VARIANTS)} "
                                                       "(default: the dataset's own)")
    parser.add_argument("--seeds", default="42,43,44", help="comma-separated seeds")
    args = parser.parse_args()
    variants = args.variants.split(",") if args.variants else list(DATASETS[args.data]["variants"])
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{args.data}.csv"
    if args.data == "random":
        print(f"{csv_path.name}: classes {dict(Counter(write_random_csv(csv_path)))}")
    else:
        rows = write_skewed_csv(csv_path)
        for site in "ab":
            print(f"{csv_path.name}: site {site}: {dict(Counter(label for label, s in rows if s == site))}")
    flower = LocalFlower(Path(tempfile.mkdtemp(prefix="small-check-flwr-")))
    results = []
    try:
        for variant in variants:
            for method in args.methods.split(","):
                for seed in seeds:
                    name = f"{method}-s{seed}" if variant == "defaults" else f"{method}-{variant}-s{seed}"
                    run_dir = out / "runs" / name
                    if not RunFolder(run_dir).finished:
                        resume = (run_dir / "checkpoint" / "state.json").exists()
                        config = (f"dataset-name='{csv_path}' test-size={TEST_SIZE} val-size={VAL_SIZE} "
                                  f"{DATASETS[args.data]['config']} "
                                  f"{VARIANTS[variant]} method='{method}' seed={seed} out-dir='{out / 'runs'}' "
                                  f"run-name='{name}' cache-dir='{out / 'cache'}' "
                                  f"resume={'true' if resume else 'false'}")
                        result = flower.run(config, timeout=1800, federation="num-supernodes=2")
                        status = flower.run_status(result.stdout + result.stderr)
                        if status != "finished:completed":
                            print(f"{name}: {status}\n{(result.stdout + result.stderr)[-3000:]}")
                            return 1
                    run = {"method": method, "variant": variant, "seed": seed, **summarise(run_dir)}
                    results.append(run)
                    print(f"{name}: final {run['final']:.1%} | best {run['best']:.1%} | last 3 {run['last3']:.1%} | "
                          f"macro-F1 {run['macro-f1']:.3f} | lowest held-out loss in round "
                          f"{run['lowest-loss-round']}", flush=True)
    finally:
        flower.stop()
    write_results(out / "results.json", args.data, results,
                  RunFolder(out / "runs" / name).config()["label-names"])
    return 0


def write_results(path: Path, data: str, runs: list[dict], label_names: list[str]) -> None:
    """Write ``results.json``, keeping the runs an earlier invocation recorded there and this one did not run."""
    key = operator.itemgetter("method", "variant", "seed")
    earlier = json.loads(path.read_text())["runs"] if path.exists() else []
    ran = {key(run) for run in runs}
    kept = [run for run in earlier if "variant" in run and key(run) not in ran]  # results.json before variants: dropped
    path.write_text(json.dumps({"data": data, "label-names": label_names, "runs": kept + runs}, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
