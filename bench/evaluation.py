"""(b) The app's central evaluation against a bare forward of the merged model, and against the old path.

    python bench/evaluation.py [--repeats 5] [--precision auto|bf16|fp32]

Evaluates the default run's 1,000 held-out tweets with a rank-8 adapter on every module:
- app: ``GlobalModel``-style merged model (peft ``merge_and_unload``) through ``training.evaluate``
  (length-sorted batches padded to a multiple of 8, ``inference_mode``, bf16 autocast where native);
- bare: the same merged model, the same batches pre-built as tensors, a plain forward loop;
- old: what the app did before: the unmerged peft model, batches in data order, fp32, ``no_grad``.
Printed: samples/s of each and the ratios app/bare (goal: close to 1) and old/app (the speed-up).
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import alternate, describe, header, ratio_line, setup, timed

from safedlora_app.core.model import build_lora_model
from safedlora_app.core.training import autocast, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    args = parser.parse_args()
    config, device, dtype, base, modules, _, test = setup(args.precision)
    torch.manual_seed(0)
    adapter = build_lora_model(base, dict.fromkeys(modules, config.rank_max), config.lora_scale, 0.0, ["classifier"])
    with torch.no_grad():  # a trained-looking adapter: B no longer zero
        for name, param in adapter.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    merged = copy.deepcopy(adapter).merge_and_unload().to(device).eval()
    adapter = adapter.to(device).eval()
    size, classes, batch = len(test), 3, config.eval_batch_size
    order = test.by_length()
    batches = [{k: v.to(device) for k, v in test.batch(order[i:i + batch]).items() if k != "labels"}
               for i in range(0, size, batch)]

    def app() -> float:
        return timed(lambda: evaluate(merged, test, batch_size=batch, num_classes=classes, device=device, dtype=dtype))

    def bare() -> float:
        def loop():
            with torch.inference_mode(), autocast(device, dtype):
                for inputs in batches:
                    merged(**inputs).logits.argmax(-1)
        return timed(loop)

    def old() -> float:
        def loop():
            with torch.no_grad():
                for first in range(0, size, batch):
                    inputs = {k: v.to(device) for k, v in test.batch(range(first, min(first + batch, size))).items()}
                    adapter(**inputs).logits.argmax(-1)
        return timed(loop)

    app(), bare(), old()  # warm-up: every padded length once
    app_times, bare_times = alternate(app, bare, args.repeats)
    old_times, app_times_2 = alternate(old, app, args.repeats)
    print(header(device, dtype))
    print(f"{size} held-out tweets, batch {batch}, LoRA r={config.rank_max} on {len(modules)} modules merged")
    for name, times in (("app (training.evaluate)", app_times), ("bare forward", bare_times),
                        ("old path (unmerged, data order, fp32)", old_times)):
        print(describe(name, [size / t for t in times], "samples/s"))
    print(ratio_line("app / bare time (goal: near 1)", app_times, bare_times))
    print(ratio_line("old / app time (speed-up)", old_times, app_times_2))


if __name__ == "__main__":
    main()
