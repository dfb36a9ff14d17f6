"""What differential privacy adds to the server's aggregation per round: time and memory, at MiniLM's and SmolLM2's
sizes.

    python bench/dp_overhead.py [--replies 50] [--repeats 3]

For each model and adapter (the default run's, the accurate profile's, the causal-lm defaults'), one round of
``--replies`` replies at rank-max (each the sent factors plus seeded changes) is aggregated by the app's exact
product aggregation and by its private one (clip, fixed-weight mean, dense Gaussian noise on every module's weight
change, SVD truncation: ``server.aggregation.private_aggregate_round``), alternately, and the ratio of the medians
printed. Memory: the peak growth of the resident set during one aggregation, sampled every 2 ms in a fresh process
for each (so neither sees the other's freed pages). The private round forms one module's dense float64 mean at a
time; the largest one's size is printed beside. Times are wall seconds on this machine with torch's default
threads.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time

import psutil
import torch

from safedlora_app.core import payload as pl
from safedlora_app.core import privacy as dp
from safedlora_app.core.config import RunConfig
from safedlora_app.core.model import adapted_modules, head_parameters, module_shapes
from safedlora_app.core.round_plan import plan_round
from safedlora_app.server.aggregation import aggregate_round, private_aggregate_round
from safedlora_app.tasks import get_task, load_base_model

SETTINGS = {
    "MiniLM, defaults (query, value; rank 8)": {},
    "MiniLM, profile accurate (37 modules; rank 16)": {"profile": "accurate"},
    "SmolLM2-135M, causal-lm defaults (every Linear layer; rank 8)": {"task": "causal-lm"},
}


def round_inputs(settings: dict, replies: int):
    """``(config, plan, replies, previous)`` of round 2 of a run with ``settings``."""
    config = RunConfig.from_mapping(settings).effective
    task = get_task(config.task)
    labels = ("negative", "neutral", "positive") if task.spec.classifies else ()
    base = load_base_model(task.model_name(config.model_name, config.cache_dir), config.task, labels, seed=0)
    heads = config.module_names(config.head_modules)
    shapes = module_shapes(base, adapted_modules(base, config.module_names(config.target_modules), heads))
    parameters = dict(base.named_parameters())
    previous = {pl.key(pl.HEAD, name): parameters[name].detach().clone() for name in head_parameters(base, heads)}
    plan = plan_round(config, 2, previous, shapes)
    g = torch.Generator().manual_seed(0)
    received = []
    for _ in range(replies):
        reply = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in previous.items()}
        for m, (b, a) in plan.factors.items():
            reply[pl.key(pl.LORA_B, m)] = b + 1e-3 * torch.randn(b.shape, generator=g)
            reply[pl.key(pl.LORA_A, m)] = a + 1e-3 * torch.randn(a.shape, generator=g)
        received.append(reply)
    return config, plan, received, previous, shapes


def peak_growth_mb(settings: dict, replies: int, private: bool) -> float:
    """In this (fresh) process: the resident set's peak growth over one aggregation, in MB (1e6 bytes)."""
    config, plan, received, previous, _ = round_inputs(settings, replies)
    process, peak, done = psutil.Process(), [0], threading.Event()
    start = process.memory_info().rss

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    if private:
        mechanism = dp.Mechanism(clip=1.0, noise_multiplier=1.0, expected_nodes=float(replies))
        private_aggregate_round(config, plan, received, previous, mechanism, dp.secret_generator())
    else:
        aggregate_round(config, plan, received, [1.0] * len(received), previous)
    done.set()
    sampler.join()
    return (max(peak[0], process.memory_info().rss) - start) / 1e6


def measured_growth(settings: dict, replies: int, private: bool) -> float:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(peak_growth_mb, (settings, replies, private))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replies", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.replies} replies per round, median of {args.repeats}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for label, settings in SETTINGS.items():
        config, plan, received, previous, shapes = round_inputs(settings, args.replies)
        mechanism = dp.Mechanism(clip=1.0, noise_multiplier=1.0, expected_nodes=float(args.replies))
        weights = [1.0] * len(received)
        plain, private = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            aggregate_round(config, plan, received, weights, previous)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            private_aggregate_round(config, plan, received, previous, mechanism, dp.secret_generator())
            private.append(time.perf_counter() - start)
        dense_mb = max(d_out * d_in for d_out, d_in in shapes.values()) * 8 / 1e6
        a, b = statistics.median(plain), statistics.median(private)
        grow_plain, grow_private = (measured_growth(settings, args.replies, p) for p in (False, True))
        print(f"{label}: {len(shapes)} modules | exact product aggregation {a:.2f} s | private {b:.2f} s "
              f"({b / a:.2f}x) | peak memory growth {grow_plain:.0f} MB against {grow_private:.0f} MB | largest "
              f"module's dense float64 mean: {dense_mb:.1f} MB")


if __name__ == "__main__":
    main()
