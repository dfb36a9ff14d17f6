"""What the benchmarks share: the default model, a node's tweets and the held-out set, as the app loads them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from safedlora_app.client.node_resources import node_resources
from safedlora_app.core.config import RunConfig
from safedlora_app.core.model import adapted_modules, pick_device
from safedlora_app.core.training import Encoded, autocast, compute_dtype
from safedlora_app.tasks import load_base_model, load_preprocessor, load_task_data


def setup(precision: str = "auto", threads: int = 0):
    """``(config, device, dtype, base model, LoRA module names, node data, held-out data)`` of the default run."""
    if threads:
        torch.set_num_threads(threads)
    config = RunConfig(precision=precision)
    device = pick_device()
    task = load_task_data(config.dataset_name, test_size=config.test_size)
    base = load_base_model(config.model_name, config.task, task.label_names, seed=config.seed)
    modules = adapted_modules(base, config.module_names(config.target_modules), ["classifier"])
    node = node_resources(config, {"partition-id": 0, "num-partitions": 2}, tuple(task.label_names))
    test = Encoded.from_dataset(task.test, load_preprocessor(config.model_name, config.task), "text",
                                config.max_seq_len)
    return config, device, compute_dtype(precision, device), base, modules, node.data, test


def bare_round(model, batches, lr: float, device: torch.device, dtype: torch.dtype) -> Callable[[], float]:
    """A bare torch + peft training pass over pre-built ``batches`` (fresh AdamW each pass), returning its seconds:
    the reference the app's ``training.train`` is timed against."""
    def one_pass() -> float:
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

        def loop():
            for batch in batches:
                with autocast(device, dtype):
                    loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return timed(loop)
    return one_pass


def alternate(a: Callable[[], float], b: Callable[[], float], repeats: int) -> tuple[list[float], list[float]]:
    """Run ``a`` and ``b`` in turn (A B A B ...), each returning its own measured seconds."""
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(a())
        times_b.append(b())
    return times_a, times_b


def timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def describe(name: str, values: list[float], unit: str = "s") -> str:
    return (f"{name}: median {statistics.median(values):.4g} {unit} "
            f"(min {min(values):.4g}, max {max(values):.4g}, n={len(values)})")


def ratio_line(label: str, a: list[float], b: list[float]) -> str:
    """Pairwise ratios a_i / b_i: robust to the machine's speed drifting between pairs."""
    ratios = [x / y for x, y in zip(a, b)]
    return (f"{label}: {statistics.median(ratios):.3f}x "
            f"(pairwise min {min(ratios):.3f}, max {max(ratios):.3f}, n={len(ratios)})")


def header(device: torch.device, dtype: torch.dtype) -> str:
    name = f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""
    return (f"device {device.type}{name}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"compute {str(dtype).removeprefix('torch.')}")
