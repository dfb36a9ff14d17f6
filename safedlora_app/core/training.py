"""Local training and evaluation loops (torch only; no Flower).

Text is tokenized once per partition and padded per batch to a multiple of 8 (dynamic padding is
~20% faster than padding to max-seq-len on CPU, and few distinct lengths spare oneDNN compiling
kernels for each new shape); images go through the image processor batch by batch so a large
partition never sits in memory as pixel tensors. Evaluation batches rows of similar length.
"""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from safedlora_app.core.files import atomic_write

PAD_MULTIPLE = 8


#: ``platform.machine()`` → (the /proc/cpuinfo line that lists CPU features, the features that mean native bf16).
BF16_FEATURES = {
    "x86_64": ("flags", {"avx512_bf16", "amx_bf16"}),
    "aarch64": ("Features", {"bf16"}),
}


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: x86 AVX512-BF16 or AMX, or Arm's BF16 extension."""
    try:
        with open("/proc/cpuinfo") as handle:
            return native_bf16(platform.machine(), handle.read())
    except OSError:
        return False


def native_bf16(machine: str, cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo`` text lists native bf16 for ``machine`` (``platform.machine()``).

    Only the features of the machine's own architecture count: under qemu-user emulation an aarch64
    process reads the x86 host's cpuinfo, whose ``avx512_bf16`` says nothing about the emulated CPU.
    """
    if machine not in BF16_FEATURES:
        return False
    key, wanted = BF16_FEATURES[machine]
    lines = (line.partition(":") for line in cpuinfo.splitlines())
    features = next((value.split() for name, _, value in lines if name.strip() == key), [])
    return not wanted.isdisjoint(features)


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for run-config ``precision`` on ``device`` (``auto``: bf16 only where native)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """bf16 autocast for the forward pass; disabled in float32."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


class Rows(Protocol):
    """A task's rows, ready for training and evaluation: what :func:`train` and a task's evaluation read.
    :class:`Encoded` (classification) and ``tasks.causal_lm.ChatRows`` implement it."""

    def __len__(self) -> int: ...

    def subset(self, indices: Sequence[int]) -> Rows:
        """The rows at ``indices``, in that order."""

    def by_length(self) -> list[int]:
        """Row indices, shortest first (for evaluation batches that pad little)."""

    def training_order(self, order: Sequence[int], batch_size: int) -> list[int]:
        """A round's samples ``order`` (drawn at random) in the order training takes them."""

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Model inputs of the rows at ``indices``, with ``labels``."""


class Encoded:
    """A dataset ready for batching: ``batch(indices)`` returns model inputs plus ``labels``.

    Text holds token ids (tokenized once); images hold the raw images (processed per batch).
    """

    def __init__(self, labels: torch.Tensor, preprocessor, tokens: list[list[int]] | None = None, images=None):
        self.labels = labels
        self.preprocessor = preprocessor
        self.tokens = tokens
        self.images = images

    @classmethod
    def from_dataset(cls, dataset, preprocessor, input_column: str, max_seq_len: int) -> Encoded:
        labels = torch.tensor(dataset["label"], dtype=torch.long)
        if input_column == "text":
            tokens = preprocessor(list(dataset["text"]), truncation=True, max_length=max_seq_len)["input_ids"]
            return cls(labels, preprocessor, tokens=tokens)
        return cls(labels, preprocessor, images=dataset[input_column] if len(dataset) else [])

    def save(self, path: Path) -> None:
        """Token ids as flat safetensors (ragged rows via offsets); written atomically."""
        lengths = torch.tensor([len(t) for t in self.tokens], dtype=torch.long)
        flat = torch.tensor([i for t in self.tokens for i in t], dtype=torch.long)
        atomic_write(path, lambda partial: save_file({"labels": self.labels, "lengths": lengths, "flat": flat},
                                                     str(partial)))

    @classmethod
    def load(cls, path: Path, preprocessor) -> Encoded:
        stored = load_file(str(path))
        tokens = [t.tolist() for t in torch.split(stored["flat"], stored["lengths"].tolist())]
        return cls(stored["labels"], preprocessor, tokens=tokens)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> Encoded:
        """The rows at ``indices``, in that order (shares the preprocessor)."""
        pick = list(indices)
        return Encoded(self.labels[pick], self.preprocessor,
                       tokens=None if self.tokens is None else [self.tokens[i] for i in pick],
                       images=None if self.images is None else [self.images[i] for i in pick])

    def by_length(self) -> list[int]:
        """Row indices, shortest text first (images: as stored), so that batches need little padding."""
        if self.tokens is None:
            return list(range(len(self)))
        return sorted(range(len(self)), key=lambda i: len(self.tokens[i]))

    def training_order(self, order: Sequence[int], batch_size: int) -> list[int]:
        """The order of a round's samples: as drawn (causal-LM rows group by length: ``ChatRows``)."""
        return list(order)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        if self.tokens is not None:
            inputs = self.preprocessor.pad({"input_ids": [self.tokens[i] for i in indices]}, return_tensors="pt",
                                           pad_to_multiple_of=PAD_MULTIPLE)
        else:
            images = [self.images[i].convert("RGB") for i in indices]
            inputs = self.preprocessor(images, return_tensors="pt")
        inputs = dict(inputs)
        inputs["labels"] = self.labels[list(indices)]
        return inputs


def proximal_term(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's ``(mu / 2) * sum ||w - w_global||^2`` over the trainable parameters."""
    total = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
    return 0.5 * mu * total


@dataclass
class TrainResult:
    loss: float
    num_examples: int
    seconds: float
    peak_memory_mb: float
    first_step_a_ratio: float | None = None
    """``||A after - A before|| / ||A before||`` over every lora_A weight, after the first optimizer step."""


def train(model: nn.Module, data: Rows, indices: Sequence[int], *, epochs: int, batch_size: int,
          grad_accum_steps: int, lr: float, weight_decay: float, prox_mu: float, seed: int,
          device: torch.device, dtype: torch.dtype = torch.float32, warmup_steps: int = 0,
          optimizer_name: str = "adamw", momentum: float = 0.9) -> TrainResult:
    """AdamW (or SGD with momentum) on the model's trainable parameters, optionally with the proximal term.

    The proximal anchor is the model as received (the global model), snapshotted here.
    ``num_examples`` is the number of distinct samples trained on: the aggregation weight.
    ``dtype`` bfloat16 runs the forward pass under autocast; parameters, gradients, the optimizer
    and the proximal term stay float32. ``warmup_steps`` ramps the learning rate linearly over the
    first optimizer steps: each round starts a fresh AdamW, whose first steps move every entry by
    about ``lr`` whatever its gradient.
    """
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if prox_mu > 0 else []
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup_steps + 1)))
    lora_a = [p for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    a_before = torch.cat([p.detach().reshape(-1) for p in lora_a]).clone() if lora_a else None
    first_step_a_ratio = None
    generator = torch.Generator().manual_seed(seed)
    losses, steps = [], 0
    for _ in range(epochs):
        order = data.training_order([indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()],
                                    batch_size)
        for first in range(0, len(order), batch_size):
            batch = {k: v.to(device) for k, v in data.batch(order[first:first + batch_size]).items()}
            with autocast(device, dtype):
                loss = model(**batch).loss.float()
            losses.append(loss.item())
            if prox_mu > 0:
                loss = loss + proximal_term(params, anchors, prox_mu)
            (loss / grad_accum_steps).backward()
            steps += 1
            if steps % grad_accum_steps == 0:
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                if a_before is not None and first_step_a_ratio is None:
                    moved = torch.cat([p.detach().reshape(-1) for p in lora_a]) - a_before
                    first_step_a_ratio = float(moved.norm() / a_before.norm().clamp_min(1e-12))
    if steps % grad_accum_steps:
        optimizer.step()
    model.eval()
    return TrainResult(
        loss=sum(losses) / max(len(losses), 1),
        num_examples=len(indices),
        seconds=time.perf_counter() - start,
        peak_memory_mb=peak_memory_mb(device),
        first_step_a_ratio=first_step_a_ratio,
    )


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated this round. CPU: the process's peak RSS so far (Linux ru_maxrss is KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.inference_mode()
def evaluate(model: nn.Module, data: Encoded, *, batch_size: int, num_classes: int,
             device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Accuracy, macro-F1 (mean over all classes) and mean cross-entropy on ``data``.

    Rows go through the model shortest first (less padding computed); every metric is a sum over
    rows, so the order changes nothing but float rounding.
    """
    model.to(device).eval()
    order = data.by_length()
    predictions, total_loss = [], 0.0
    for first in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in data.batch(order[first:first + batch_size]).items()}
        with autocast(device, dtype):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        total_loss += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        predictions.append(logits.argmax(dim=-1).cpu())
    predicted = torch.empty(len(order), dtype=torch.long)
    predicted[torch.tensor(order, dtype=torch.long)] = torch.cat(predictions)
    return {"accuracy": float((predicted == data.labels).float().mean()),
            "macro-f1": macro_f1(predicted, data.labels, num_classes),
            "loss": total_loss / len(data)}


def macro_f1(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over ``num_classes`` classes (0 for a class never hit)."""
    scores = []
    for c in range(num_classes):
        tp = int(((predicted == c) & (labels == c)).sum())
        fp = int(((predicted == c) & (labels != c)).sum())
        fn = int(((predicted != c) & (labels == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / num_classes
