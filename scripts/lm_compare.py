"""causal-lm: sa-fedlora against fedit on the same seeds, partitions and held-out replies, paired by seed.

    python scripts/lm_compare.py OUT [--seeds 3] [--set KEY=VALUE ...] [--report-only]

Each (method, seed) is one `flwr run .` of ``task = "causal-lm"`` on its defaults (2 simulated nodes, SmolLM2,
the chitchat conversations), with ``--set`` values over them, into ``OUT/runs/<method>-s<seed>``. A run with a
summary.json is finished and skipped, and an interrupted one resumes from its checkpoint, so the command goes on
where it stopped. It writes ``OUT/table.md``: each
run's final and best held-out loss and MB sent, and sa-fedlora minus fedit per seed with the mean difference and
its 95% Student-t interval; fedit runs at sa-fedlora's rank-max, on the same modules and wire dtype.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safedlora_app.tools.compare.plan import parse_set
from safedlora_app.tools.compare.tables import paired_interval
from safedlora_app.tools.simulation import LocalFlower

METHODS = ("sa-fedlora", "fedit")
FIRST_SEED = 42


def run_config(method: str, seed: int, out: Path, settings: dict) -> str:
    """The run's --run-config; a run interrupted after round 0 continues from its checkpoint (resume = true)."""
    name = f"{method}-s{seed}"
    values = {"task": "causal-lm", **settings, "method": method, "seed": seed, "out-dir": str(out / "runs"),
              "run-name": name, "resume": (out / "runs" / name / "metrics.jsonl").exists()}
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in values.items())


def summary(out: Path, method: str, seed: int) -> dict | None:
    path = out / "runs" / f"{method}-s{seed}" / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def report(out: Path, seeds: list[int], settings: dict) -> str:
    lines = ["| method | seed | final loss | best loss | final perplexity | MB sent | wall s |",
             "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for seed in seeds:
            if s := summary(out, method, seed):
                best = min(r["loss"] for r in _records(out, method, seed) if r["round"] > 0 and r["loss"] is not None)
                lines.append(f"| {method} | {seed} | {s['final-loss']:.4f} | {best:.4f} | {s['final-perplexity']:.2f} "
                             f"| {s['total-mb']:.2f} | {s['wall-seconds']:.0f} |")
    pairs = [(summary(out, "sa-fedlora", s), summary(out, "fedit", s)) for s in seeds]
    pairs = [(a, b) for a, b in pairs if a and b]
    lines += ["", f"Paired by seed ({len(pairs)} pairs), sa-fedlora minus fedit:", ""]
    for label, key in (("final held-out loss", "final-loss"), ("MB sent", "total-mb")):
        diffs = [a[key] - b[key] for a, b in pairs]
        interval = paired_interval(diffs)
        text = "n/a (fewer than 3 pairs)" if interval is None else \
            f"{interval[0]:+.4f} (95% interval {interval[1]:+.4f} to {interval[2]:+.4f})"
        lines.append(f"- {label}: {text}; per seed {', '.join(f'{d:+.4f}' for d in diffs)}")
    if pairs:
        ratio = [a["total-mb"] / b["total-mb"] for a, b in pairs]
        lines.append(f"- bytes of sa-fedlora / fedit: {min(ratio):.3f}-{max(ratio):.3f}")
    lines += ["", f"Settings over the causal-lm defaults: {settings or 'none'}."]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def _records(out: Path, method: str, seed: int) -> list[dict]:
    path = out / "runs" / f"{method}-s{seed}" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    out = args.out.resolve()
    seeds = [FIRST_SEED + k for k in range(args.seeds)]
    settings = parse_set(args.set)
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        flower = LocalFlower(out / "flwr-home")
        (out / "flwr-home").mkdir(exist_ok=True)
        try:
            for seed in seeds:  # seed by seed: each finished seed is a finished pair
                for method in METHODS:
                    if summary(out, method, seed):
                        continue
                    started = time.time()
                    print(f"{time.strftime('%H:%M:%S')} {method} seed {seed} ...", flush=True)
                    result = flower.run(run_config(method, seed, out, settings), timeout=900,
                                        progress=out / "runs" / f"{method}-s{seed}" / "metrics.jsonl")
                    (out / f"{method}-s{seed}.log").write_text(result.stdout + result.stderr)
                    done = summary(out, method, seed)
                    print(f"{time.strftime('%H:%M:%S')} {method} seed {seed}: "
                          f"{'final loss %.4f' % done['final-loss'] if done else 'FAILED (see its log)'} "
                          f"in {time.time() - started:.0f} s", flush=True)
        finally:
            flower.stop()
    print(report(out, seeds, settings))


if __name__ == "__main__":
    main()
