"""(g) causal-lm: the app's client training step against a bare torch + peft loop, and gradient checkpointing.

    python bench/lm_train_step.py [--steps 4] [--repeats 3] [--precision auto|bf16|fp32] [--threads 1]

Both train SmolLM2-135M-Instruct (the causal-lm default) with LoRA r=8 on the 7 projections of its 30 layers,
batch 4, AdamW, in the same precision, over the same batches of chitchat replies (128 tokens at most), in the
same order. The app side is ``training.train`` on a model from ``build_lora_model`` with the rows of
``chat.ChatRows`` (what a ClientApp runs); the bare side is ``get_peft_model`` and a plain loop over the same
pre-padded tensors. Printed: seconds per step and samples per second for each, their ratio (A B A B ... after a
warm-up pass; goal <= 1.10x), then the app with gradient checkpointing (the node-config option for small
devices): its time per step against the plain app's, and the peak memory of each, every one measured in a fresh
process (a process's peak RSS never falls).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys

import torch
from common import alternate, bare_round, describe, header, ratio_line
from peft import LoraConfig, get_peft_model

from safedlora_app.core.config import RunConfig
from safedlora_app.core.data import partition_dataset
from safedlora_app.core.model import adapted_modules, build_lora_model, checkpoint_activations, pick_device
from safedlora_app.core.training import compute_dtype, peak_memory_mb, train
from safedlora_app.tasks import get_task, load_base_model, load_preprocessor, load_task_data
from safedlora_app.tasks.causal_lm import ChatRows

SEED = 7


def setup(precision: str, threads: int):
    torch.set_num_threads(threads)
    config = RunConfig.from_mapping({"task": "causal-lm", "precision": precision})
    device = pick_device()
    name = get_task(config.task).model_name("", config.cache_dir)
    base = load_base_model(name, config.task, (), seed=config.seed)
    tokenizer = load_preprocessor(name, config.task)
    task = load_task_data("", task=config.task, test_size=config.test_size)
    part = partition_dataset(task.train, partitioner="dirichlet", num_partitions=2, partition_id=0,
                             alpha=config.dirichlet_alpha, seed=config.seed, partition_by=config.natural_column)
    data = ChatRows.from_dataset(part, tokenizer, config.max_seq_len)
    modules = adapted_modules(base, config.module_names(config.target_modules), [])
    return config, device, compute_dtype(config.precision, device), base, modules, data


def app_trainer(config, device, dtype, base, modules, data, indices, checkpointed=False):
    model = build_lora_model(base, dict.fromkeys(modules, config.rank_max), config.lora_scale, 0.0, [])
    if checkpointed:
        checkpoint_activations(model)
    return lambda: train(model, data, indices, epochs=1, batch_size=config.batch_size, grad_accum_steps=1,
                         lr=config.lr, weight_decay=0.0, prox_mu=0.0, seed=SEED, device=device, dtype=dtype).seconds


def memory_probe(precision: str, threads: int, steps: int, checkpointed: bool) -> dict:
    """One round of ``steps`` steps in this (fresh) process: its seconds and peak RSS."""
    config, device, dtype, base, modules, data = setup(precision, threads)
    indices = list(range(steps * config.batch_size))
    seconds = app_trainer(config, device, dtype, base, modules, data, indices, checkpointed)()
    return {"seconds": seconds, "peak_mb": peak_memory_mb(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a simulated client uses 1)")
    parser.add_argument("--probe", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(memory_probe(args.precision, args.threads, args.steps, args.probe == "checkpointed")))
        return

    config, device, dtype, base, modules, data = setup(args.precision, args.threads)
    batch_size = config.batch_size
    indices = list(range(args.steps * batch_size))
    # The app's own order for this seed (shuffled, then grouped by length), so that the bare loop sees its batches.
    drawn = [indices[i] for i in torch.randperm(len(indices), generator=torch.Generator().manual_seed(SEED)).tolist()]
    order = data.training_order(drawn, batch_size)
    batches = [{k: v.to(device) for k, v in data.batch(order[i:i + batch_size]).items()}
               for i in range(0, len(order), batch_size)]
    app_round = app_trainer(config, device, dtype, base, modules, data, indices)
    bare_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=config.rank_max, lora_alpha=config.lora_scale * config.rank_max,
        target_modules=config.module_names(config.target_modules))).to(device)

    bare_pass = bare_round(bare_model, batches, config.lr, device, dtype)
    app_round(), bare_pass()  # warm-up: every sequence length once
    app, bare = alternate(app_round, bare_pass, args.repeats)
    steps = len(batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(header(device, dtype))
    print(f"{steps} steps of batch {batch_size} per pass ({tokens} tokens), LoRA r={config.rank_max} on "
          f"{len(modules)} modules of SmolLM2-135M-Instruct")
    print(describe("app step (training.train)", [t / steps for t in app]))
    print(describe("bare torch + peft step", [t / steps for t in bare]))
    print(f"app: {steps * batch_size / min(app):.2f} samples/s, bare: {steps * batch_size / min(bare):.2f} samples/s")
    print(ratio_line("app / bare (goal <= 1.10)", app, bare))

    probes = {}
    for kind in ("plain", "checkpointed"):  # each in a fresh process: a process's peak RSS never falls
        out = subprocess.run([sys.executable, __file__, "--probe", kind, "--steps", str(args.steps), "--precision",
                              args.precision, "--threads", str(args.threads)], capture_output=True, text=True,
                             check=True).stdout
        probes[kind] = json.loads(out.strip().splitlines()[-1])
    plain, checkpointed = probes["plain"], probes["checkpointed"]
    print(f"one client round of {args.steps} steps in a fresh process: peak RSS {plain['peak_mb']:.0f} MB, "
          f"{plain['seconds'] / args.steps:.2f} s per step (first round: kernels compiled on the way)")
    print(f"with gradient-checkpointing = true: peak RSS {checkpointed['peak_mb']:.0f} MB "
          f"({checkpointed['peak_mb'] / plain['peak_mb']:.3f}x), {checkpointed['seconds'] / args.steps:.2f} s per step "
          f"({checkpointed['seconds'] / plain['seconds']:.3f}x)")


if __name__ == "__main__":
    main()
