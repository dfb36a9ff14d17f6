"""What client-level differential privacy costs on 1,000 simulated nodes: accuracy, bytes and a membership check.

    python -m safedlora_lab.privacy_study [--out results/privacy] [--seeds 3] [--epsilons 8,3,1]
                                          [--methods sa-fedlora,fedit] [--report-only]

Every run is one ``flwr run`` of the tweets on 1,000 simulated nodes (``partitioner = "inner-dirichlet"``: every node
the same share, its own label mix), ``fraction-train = 0.05`` (50 nodes a round, Poisson-sampled in private runs),
the app's defaults otherwise. Each method runs without DP and at every epsilon, on the same seeds (data, partitions,
initialisation; a private run's sampling and noise are secret, so not paired).

1. **The clip, chosen on a tuning seed** (41, not a reporting seed): one run per method with no clipping and
   negligible noise logs each round's median update norm (``dp-norm``); C is the median over the rounds, rounded
   to 2 significant digits (McMahan et al. 2018 clip at about the median). Stored in ``<out>/clips.json``.
2. **The runs**: ``<method>-<arm>-s<seed>`` with arm ``none`` or ``eps<e>``, into ``<out>/runs``; finished runs are
   skipped, so the command goes on where it stopped.
3. **The membership check**: a loss-threshold attack on each finished run's final model. Members are the training
   rows of the nodes whose replies were aggregated in some round (the run's ``trained`` lists); non-members are the
   test rows, which no node holds. AUC = P(a member's loss < a non-member's loss), ties counted half: 0.5 is no
   signal. ``<out>/table.md`` holds every run, the means per (method, arm), and each arm minus the non-private run,
   paired by seed, with its 95% interval.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from safedlora_app.core.config import RunConfig
from safedlora_app.core.run_folder import RunFolder
from safedlora_app.tools.simulation import LocalFlower

from .compare.plan import FIRST_SEED, TUNE_SEED, run_config_string
from .compare.tables import paired_interval

NODES = 1000
FEDERATION = f"num-supernodes={NODES} client-resources-num-cpus=1"
#: What every run shares: the 1,000-node split and the sampling rate; the app's defaults otherwise.
SETTINGS = {"partitioner": "inner-dirichlet", "fraction-train": 0.05}
METHODS = ("sa-fedlora", "fedit")
EPSILONS = (8.0, 3.0, 1.0)
#: The tuning run: every update passes unclipped, and the noise is too small to matter; it logs the norms.
MEASURE_NORMS = {"dp-clip": 1e9, "dp-noise-multiplier": 1e-9}
#: Seconds without a new metrics line before a run counts as stuck.
STALL_TIMEOUT = 1800


def arm_name(epsilon: float | None) -> str:
    return "none" if epsilon is None else f"eps{epsilon:g}"


def run_settings(method: str, epsilon: float | None, clip: float | None, seed: int, runs: Path, name: str) -> dict:
    private = {} if epsilon is None else {"dp-target-epsilon": epsilon, "dp-clip": clip}
    return {**SETTINGS, "method": method, **private, "seed": seed, "out-dir": str(runs), "run-name": name,
            "resume": RunFolder(runs / name).started}


def run(flower: LocalFlower, root: Path, name: str, settings: dict, say) -> dict | None:
    """One run (skipped when finished); its summary, or ``None`` when it failed."""
    folder = RunFolder(root / "runs" / name)
    if not folder.finished:
        started = time.time()
        say(f"{time.strftime('%H:%M:%S')} {name} ...")
        result = flower.run(run_config_string(settings), timeout=STALL_TIMEOUT, federation=FEDERATION,
                            progress=folder.file("metrics.jsonl"))
        (root / f"{name}.log").write_text(result.stdout + result.stderr)
        say(f"{time.strftime('%H:%M:%S')} {name}: {'done' if folder.finished else 'FAILED (see its log)'} in "
            f"{time.time() - started:.0f} s")
    return folder.summary()


def clip_from(folder: RunFolder) -> float:
    """The median over the rounds of each round's median update norm, to 2 significant digits."""
    norm = float(np.median([r["dp-norm"] for r in folder.rounds() if r.get("dp-norm") is not None]))
    return float(f"{norm:.2g}")


def membership_auc(folder: RunFolder, nodes: int = NODES, rows: int = 2000) -> float:
    """The loss-threshold attack's AUC on ``folder``'s final model, a run of ``nodes`` simulated nodes (see the
    module docstring), on at most ``rows`` members and ``rows`` non-members drawn at random (seed 0)."""
    from peft import PeftModel

    from safedlora_app.core.data import partition_dataset
    from safedlora_app.tasks import get_task, load_task_data
    from safedlora_app.tasks.base import columns_of

    config = RunConfig.from_mapping(folder.effective())
    task = get_task(config.task)
    data = load_task_data(config.dataset_name, test_size=config.test_size, val_size=config.val_size,
                          **dict(task=config.task, **columns_of(config)))
    trained = sorted({name for r in folder.rounds() for name in r.get("trained", [])})
    members = [partition_dataset(data.train, partitioner=config.partitioner, num_partitions=nodes,
                                 partition_id=int(name.removeprefix("partition-")), alpha=config.dirichlet_alpha,
                                 seed=config.seed, natural_column=config.natural_column)
               for name in trained]
    model_name = task.model_name(config.model_name, config.cache_dir)
    base = task.base_model(model_name, data.label_names, config.seed)
    model = PeftModel.from_pretrained(base, str(folder.path / "adapter")).eval()
    tokenizer = task.preprocessor(model_name)

    def losses(texts: Sequence[str], labels: Sequence[int]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), 128):
                batch = tokenizer(list(texts[start:start + 128]), truncation=True, max_length=config.max_seq_len,
                                  padding=True, return_tensors="pt")
                logits = model(**batch).logits
                target = torch.tensor(labels[start:start + 128])
                out.append(torch.nn.functional.cross_entropy(logits, target, reduction="none").numpy())
        return np.concatenate(out)

    column, draw = data.input_column, np.random.default_rng(0)

    def sample(texts: list, labels: list) -> tuple[list, list]:
        keep = sorted(draw.permutation(len(texts))[:rows])
        return [texts[i] for i in keep], [int(labels[i]) for i in keep]

    inside = losses(*sample([t for part in members for t in part[column]],
                            [y for part in members for y in part["label"]]))
    outside = losses(*sample(list(data.test[column]), list(data.test["label"])))
    return loss_auc(inside, outside)


def loss_auc(members: Sequence[float], others: Sequence[float]) -> float:
    """P(a member's loss < a non-member's loss), ties counted half: the Mann-Whitney U of the non-members' losses
    over the number of pairs. 0.5: the losses tell nothing; 1: every member below every non-member."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(others, members).statistic / (len(members) * len(others)))


def report(root: Path, methods: Sequence[str], epsilons: Sequence[float], seeds: Sequence[int]) -> str:
    """``table.md``: every finished run, the means per (method, arm), and each arm minus no DP, paired by seed."""
    cache = root / "membership.json"
    aucs = json.loads(cache.read_text()) if cache.exists() else {}
    arms = [None, *epsilons]
    results: dict[tuple[str, str, int], dict] = {}
    for method in methods:
        for epsilon in arms:
            for seed in seeds:
                name = f"{method}-{arm_name(epsilon)}-s{seed}"
                folder = RunFolder(root / "runs" / name)
                if not (summary := folder.summary()):
                    continue
                if name not in aucs:
                    aucs[name] = membership_auc(folder)
                    cache.write_text(json.dumps(aucs, indent=1, sort_keys=True))
                results[method, arm_name(epsilon), seed] = {**summary, "auc": aucs[name]}
    lines = ["| method | DP | seed | final accuracy | macro-F1 | epsilon spent | MB sent | membership AUC | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (method, arm, seed), s in results.items():
        spent = "-" if s.get("final-epsilon") is None else f"{s['final-epsilon']:.2f}"
        lines.append(f"| {method} | {arm} | {seed} | {s['final-accuracy']:.1%} | {s['final-macro-f1']:.3f} | {spent} "
                     f"| {s['total-mb']:.1f} | {s['auc']:.3f} | {s['wall-seconds']:.0f} |")
    lines += ["", "| method | DP | runs | mean accuracy | mean membership AUC | accuracy minus no DP, paired "
              "(95% interval) |", "|---|---|---|---|---|---|"]
    for method in methods:
        for epsilon in arms:
            arm = arm_name(epsilon)
            runs = {seed: s for (m, a, seed), s in results.items() if m == method and a == arm}
            if not runs:
                continue
            mean = sum(s["final-accuracy"] for s in runs.values()) / len(runs)
            auc = sum(s["auc"] for s in runs.values()) / len(runs)
            diffs = [100 * (s["final-accuracy"] - results[method, "none", seed]["final-accuracy"])
                     for seed, s in runs.items() if (method, "none", seed) in results]
            interval = paired_interval(diffs) if epsilon is not None else None
            paired = "-" if epsilon is None else (
                f"{', '.join(f'{d:+.1f}' for d in diffs)} (fewer than 3 pairs)" if interval is None
                else f"{interval[0]:+.1f} [{interval[1]:+.1f}, {interval[2]:+.1f}]")
            lines.append(f"| {method} | {arm} | {len(runs)} | {mean:.1%} | {auc:.3f} | {paired} |")
    clips = root / "clips.json"
    lines += ["", f"Clips chosen on tuning seed {TUNE_SEED}: {clips.read_text().strip() if clips.exists() else '-'}; "
              f"settings over the app's defaults: {SETTINGS}, {NODES} nodes."]
    text = "\n".join(lines) + "\n"
    (root / "table.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safedlora_lab.privacy_study", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/privacy", help="results directory (default: results/privacy)")
    parser.add_argument("--seeds", type=int, default=3, help="reporting seeds, from 42 (default 3)")
    parser.add_argument("--epsilons", default="8,3,1", help="target epsilons (default 8,3,1)")
    parser.add_argument("--methods", default=",".join(METHODS), help="app methods (default sa-fedlora,fedit)")
    parser.add_argument("--report-only", action="store_true", help="write the table from the finished runs")
    args = parser.parse_args(argv)
    epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if bad := [e for e in epsilons if not (e > 0 and math.isfinite(e))]:
        parser.error(f"--epsilons {bad} is not allowed; give positive numbers, e.g. 8,3,1")
    if bad := [m for m in methods if m not in METHODS + ("ffa-lora",)]:
        parser.error(f"--methods {bad} is not allowed; choose from sa-fedlora, fedit, ffa-lora")
    seeds = [FIRST_SEED + k for k in range(args.seeds)]
    root = Path(args.out).resolve()
    if not args.report_only:
        (root / "flwr-home").mkdir(parents=True, exist_ok=True)
        flower = LocalFlower(root / "flwr-home")
        try:
            clips_file = root / "clips.json"
            clips = json.loads(clips_file.read_text()) if clips_file.exists() else {}
            for method in methods:
                if method not in clips:
                    name = f"{method}-norms-s{TUNE_SEED}"
                    settings = {**run_settings(method, None, None, TUNE_SEED, root / "runs", name), **MEASURE_NORMS}
                    if run(flower, root, name, settings, print) is None:
                        return 1
                    clips[method] = clip_from(RunFolder(root / "runs" / name))
                    clips_file.write_text(json.dumps(clips, indent=1, sort_keys=True))
            for seed in seeds:
                for method in methods:
                    for epsilon in [None, *epsilons]:
                        name = f"{method}-{arm_name(epsilon)}-s{seed}"
                        run(flower, root, name, run_settings(method, epsilon, clips[method], seed, root / "runs", name),
                            print)
        finally:
            flower.stop()
    print(report(root, methods, epsilons, seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
