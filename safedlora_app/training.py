"""Local training and evaluation loops (torch only; no Flower).

Text is tokenized once per partition and padded per batch (dynamic padding is ~20% faster than
padding to max-seq-len on CPU); images go through the image processor batch by batch so a large
partition never sits in memory as pixel tensors.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


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
        partial = path.with_suffix(f".{os.getpid()}.partial")
        save_file({"labels": self.labels, "lengths": lengths, "flat": flat}, str(partial))
        partial.replace(path)

    @classmethod
    def load(cls, path: Path, preprocessor) -> Encoded:
        stored = load_file(str(path))
        tokens = [t.tolist() for t in torch.split(stored["flat"], stored["lengths"].tolist())]
        return cls(stored["labels"], preprocessor, tokens=tokens)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        if self.tokens is not None:
            inputs = self.preprocessor.pad({"input_ids": [self.tokens[i] for i in indices]}, return_tensors="pt")
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


def train(model: nn.Module, data: Encoded, indices: Sequence[int], *, epochs: int, batch_size: int,
          grad_accum_steps: int, lr: float, weight_decay: float, prox_mu: float, seed: int,
          device: torch.device) -> TrainResult:
    """AdamW on the model's trainable parameters, optionally with the proximal term.

    The proximal anchor is the model as received (the global model), snapshotted here.
    ``num_examples`` is the number of distinct samples trained on: the aggregation weight.
    """
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if prox_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    losses, steps = [], 0
    for _ in range(epochs):
        order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        for first in range(0, len(order), batch_size):
            batch = {k: v.to(device) for k, v in data.batch(order[first:first + batch_size]).items()}
            loss = model(**batch).loss
            losses.append(loss.item())
            if prox_mu > 0:
                loss = loss + proximal_term(params, anchors, prox_mu)
            (loss / grad_accum_steps).backward()
            steps += 1
            if steps % grad_accum_steps == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    if steps % grad_accum_steps:
        optimizer.step()
    model.eval()
    return TrainResult(
        loss=sum(losses) / max(len(losses), 1),
        num_examples=len(indices),
        seconds=time.perf_counter() - start,
        peak_memory_mb=peak_memory_mb(device),
    )


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated this round. CPU: the process's peak RSS so far (Linux ru_maxrss is KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, *, batch_size: int, num_classes: int,
             device: torch.device) -> dict[str, float]:
    """Accuracy, macro-F1 (mean over all classes) and mean cross-entropy on ``data``."""
    model.to(device).eval()
    predictions, total_loss = [], 0.0
    for first in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in data.batch(range(first, min(first + batch_size, len(data)))).items()}
        output = model(**batch)
        total_loss += output.loss.item() * len(batch["labels"])
        predictions.append(output.logits.argmax(dim=-1).cpu())
    predicted = torch.cat(predictions)
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


def sample_indices(size: int, count: int, seed: int) -> list[int]:
    """``count`` distinct indices of ``range(size)`` (all of them when count is 0 or too large)."""
    if count <= 0 or count >= size:
        return list(range(size))
    return sorted(torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count].tolist())


def mix_seed(*values: int) -> int:
    """One deterministic seed from several integers (run seed, round, partition, ...)."""
    seed = 0
    for value in values:
        seed = (seed * 1_000_003 + int(value)) % (2**63 - 1)
    return seed
