"""Plots of one or several runs' ``metrics.jsonl`` records (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Records = Sequence[Mapping]


def plot_runs(runs: Mapping[str, Records], out_dir: Path) -> list[Path]:
    """Accuracy vs round, accuracy vs cumulative MB and budget vs round; one line per run, and a dashed one
    for a run's federated accuracy (``fed-accuracy``) where it has one. Language-model runs (causal-lm)
    plot their held-out loss instead (``loss_vs_round.png``, ``loss_vs_mb.png``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    language = any(r.get("perplexity") is not None or r.get("fed-perplexity") is not None
                   for records in runs.values() for r in records)
    metric, metric_label = ("loss", "held-out loss per response token") if language else ("accuracy", "accuracy")
    for name, x_key, x_label, y_key, y_label in (
        (f"{metric}_vs_round.png", "round", "round", metric, metric_label),
        (f"{metric}_vs_mb.png", "cumulative-mb", "cumulative MB sent (down + up, all nodes)", metric, metric_label),
        ("budget_vs_round.png", "round", "round", "budget", "total LoRA rank (budget)"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        drawn = False
        for label, records in runs.items():
            for key, style, suffix in ((y_key, "-", ""), (f"fed-{y_key}", "--", " (federated)")):
                points = [(r[x_key], r[key]) for r in records if r.get(key) is not None and r.get(x_key) is not None]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, marker="o", markersize=3, label=label + suffix)
                    drawn = True
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        if x_key == "cumulative-mb":
            ax.set_xscale("symlog", linthresh=1.0)
        if drawn and len(ax.get_lines()) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_paired(points: Sequence[tuple[str, float, float, float | None, float | None]], reference: str,
                path: Path) -> Path:
    """Each method's paired difference to ``reference`` in final accuracy (points; the 95% interval as a bar,
    none from fewer than 3 pairs) against the MB it sent, log scale; the reference at 0 and -1 point dashed.

    ``points``: ``(method, MB sent, mean difference, interval low, interval high)``.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, mb, mean, low, high in points:
        errors = None if low is None else [[mean - low], [high - mean]]
        ax.errorbar([mb], [mean], yerr=errors, fmt="o", capsize=4, label=label)
    ax.axhline(0.0, color="grey", linewidth=1)
    ax.axhline(-1.0, color="grey", linewidth=1, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("MB sent in the run (down + up, all nodes; log scale)")
    ax.set_ylabel(f"final accuracy − {reference}'s, points (paired)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ranks(records: Records, path: Path) -> Path | None:
    """Heat map of each module's rank over rounds (LoRA rounds only); ``None`` if there are none."""
    rounds = [r for r in records if r.get("ranks")]
    if not rounds:
        return None
    modules = list(rounds[0]["ranks"])
    grid = [[r["ranks"].get(m, 0) for r in rounds] for m in modules]
    fig, ax = plt.subplots(figsize=(6.4, 0.25 * len(modules) + 1.6))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(rounds)), [str(r["round"]) for r in rounds], fontsize=7)
    ax.set_yticks(range(len(modules)), [_short(m) for m in modules], fontsize=7)
    ax.set_xlabel("round")
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _short(module: str) -> str:
    """'bert.encoder.layer.3.attention.self.query' -> 'layer.3.query'."""
    parts = module.split(".")
    numbered = [f"{p}.{parts[i + 1]}" for i, p in enumerate(parts[:-1]) if parts[i + 1].isdigit()]
    return ".".join(numbered[-1:] + [parts[-1]])
