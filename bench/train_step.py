"""(a) The app's client training step against a bare torch + peft loop on the same batches.

    python bench/train_step.py [--steps 10] [--repeats 5] [--precision auto|bf16|fp32]

Both train MiniLM with LoRA r=8 on query/value plus the classifier head, batch 16, AdamW, in the
same precision, over the same batches in the same order. The app side is ``training.train`` on a
model from ``build_lora_model`` (what a ClientApp runs); the bare side is ``get_peft_model`` and a
plain loop over pre-padded tensors. Printed: seconds per step for each and their ratio, measured
A B A B ... in one process after a warm-up pass (oneDNN compiles kernels per new shape). Goal: <= 1.10x.

``--compile`` also times ``torch.compile`` of the app's model: the first pass (compilation included)
and later passes, and how many steps it needs to pay for its compilation. The LoRA model is rebuilt
every round (its ranks change), so a run would pay the compilation every round.
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import alternate, bare_round, describe, header, ratio_line, setup
from peft import LoraConfig, get_peft_model

from safedlora_app.core.model import build_lora_model
from safedlora_app.core.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the app's model")
    args = parser.parse_args()
    config, device, dtype, base, modules, data, _ = setup(args.precision)
    batch_size, seed = config.batch_size, 7
    indices = list(range(args.steps * batch_size))
    # The app's own order for this seed, so that the bare loop sees identical batches.
    order = [indices[i] for i in torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).tolist()]
    batches = [{k: v.to(device) for k, v in data.batch(order[i:i + batch_size]).items()}
               for i in range(0, len(order), batch_size)]
    ranks = dict.fromkeys(modules, config.rank_max)

    app_model = build_lora_model(base, ranks, config.lora_scale, 0.0, ["classifier"])
    bare_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=config.rank_max, lora_alpha=config.lora_scale * config.rank_max, target_modules=["query", "value"],
        modules_to_save=["classifier"])).to(device)

    def app_round() -> float:
        return train(app_model, data, indices, epochs=1, batch_size=batch_size, grad_accum_steps=1, lr=config.lr,
                     weight_decay=0.0, prox_mu=0.0, seed=seed, device=device, dtype=dtype).seconds

    bare_pass = bare_round(bare_model, batches, config.lr, device, dtype)
    app_round(), bare_pass()  # warm-up: every sequence length once
    app, bare = alternate(app_round, bare_pass, args.repeats)
    steps = len(batches)
    print(header(device, dtype))
    print(f"{steps} steps of batch {batch_size} per pass, LoRA r={config.rank_max} on {len(modules)} modules + head")
    print(describe("app step (training.train)", [t / steps for t in app]))
    print(describe("bare torch + peft step", [t / steps for t in bare]))
    print(f"app: {steps * batch_size / min(app):.1f} samples/s, bare: {steps * batch_size / min(bare):.1f} samples/s")
    print(ratio_line("app / bare (goal <= 1.10)", app, bare))
    if args.compile:
        compiled = torch.compile(build_lora_model(base, ranks, config.lora_scale, 0.0, ["classifier"]))

        def compiled_round() -> float:
            return train(compiled, data, indices, epochs=1, batch_size=batch_size, grad_accum_steps=1, lr=config.lr,
                         weight_decay=0.0, prox_mu=0.0, seed=seed, device=device, dtype=dtype).seconds

        first = compiled_round()
        later, plain = alternate(compiled_round, app_round, args.repeats)
        saved_per_step = (min(plain) - min(later)) / steps
        print(f"torch.compile: first pass {first:.1f} s (compilation included), then "
              f"{min(later) / steps:.4f} s per step against {min(plain) / steps:.4f} s uncompiled")
        print(ratio_line("compiled / uncompiled step", later, plain))
        print("break-even: " + (f"{(first - min(later)) / saved_per_step:.0f} steps" if saved_per_step > 0
                                else "never (no faster per step)"))


if __name__ == "__main__":
    main()
