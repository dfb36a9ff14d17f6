"""Check that a client's training and evaluation run on CUDA, in bf16, where a GPU is present.

    python scripts/cuda_check.py

Builds a MiniLM-sized BERT classifier with random weights (no download), puts peft LoRA on it at the app's
ranks and scale, then runs the app's own ``training.train`` and ``training.evaluate`` on the device that
``model.pick_device`` picks (the same rule, restated here when ``flwr`` is not installed). Prints one JSON line
and exits 1 if anything ran elsewhere than on the GPU or gave a non-finite loss.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safedlora_app.core import training  # noqa: E402  (torch and safetensors only)


def device() -> tuple[torch.device, str]:
    """The app's own ``pick_device`` when it imports (it needs flwr), else the same rule."""
    try:
        from safedlora_app.core.model import pick_device
    except ImportError as error:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), f"restated ({error.name} missing)"
    return pick_device(), "safedlora_app.core.model.pick_device"


def main() -> int:
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    picked, how = device()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, num_labels=3)
    model = get_peft_model(BertForSequenceClassification(config), LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]))
    rows = 320
    tokens = [torch.randint(1000, 30000, (int(n),)).tolist() for n in torch.randint(8, 64, (rows,))]

    class Pad:  # the tokenizer's pad(): right-pad ids to a multiple of 8, with the attention mask
        def pad(self, batch, return_tensors, pad_to_multiple_of):
            ids = batch["input_ids"]
            width = -(-max(map(len, ids)) // pad_to_multiple_of) * pad_to_multiple_of
            return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                    "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}

    data = training.Encoded(torch.randint(0, 3, (rows,)), Pad(), tokens=tokens)
    dtype = training.compute_dtype("auto", picked)
    start = time.perf_counter()
    result = training.train(model, data, list(range(rows)), epochs=1, batch_size=16, grad_accum_steps=1, lr=3e-3,
                            weight_decay=0.0, prox_mu=0.01, seed=0, device=picked, dtype=dtype)
    metrics = training.evaluate(model, data, batch_size=64, num_classes=3, device=picked, dtype=dtype)
    on = {p.device.type for p in model.parameters()}
    report = {"device": str(picked), "picked-by": how, "gpu": torch.cuda.get_device_name() if picked.type == "cuda"
              else None, "dtype": str(dtype), "parameters-on": sorted(on), "train-loss": result.loss,
              "train-samples-per-s": rows / result.seconds, "peak-memory-mb": result.peak_memory_mb,
              "eval-loss": metrics["loss"], "seconds": time.perf_counter() - start, "torch": torch.__version__}
    print(json.dumps(report))
    ok = (torch.cuda.is_available() == (picked.type == "cuda") and on == {picked.type}
          and all(map(torch.isfinite, torch.tensor([result.loss, metrics["loss"]]))))
    if torch.cuda.is_available():
        ok = ok and dtype == torch.bfloat16 and result.peak_memory_mb > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
