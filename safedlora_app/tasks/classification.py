"""What the two classification tasks share: a pre-trained encoder with a new head for the class names, and held-out
accuracy, macro-F1 and loss (:func:`~safedlora_app.core.training.evaluate`)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from safedlora_app.core.model import pretrained, quiet_transformers
from safedlora_app.core.training import Rows, evaluate

from .base import Task


class Classification(Task):
    """A classification task: ``auto_model`` names the transformers class of its models."""

    @abstractmethod
    def auto_model(self) -> Any:
        """The transformers ``AutoModelFor...Classification`` class."""

    def base_model(self, model_name: str, label_names: Sequence[str], seed: int) -> nn.Module:
        quiet_transformers()
        torch.manual_seed(seed)  # the new head's initialisation
        model = pretrained(self.auto_model().from_pretrained, model_name, "a model", num_labels=len(label_names),
                           id2label=dict(enumerate(label_names)),
                           label2id={name: i for i, name in enumerate(label_names)}, ignore_mismatched_sizes=True)
        return model.eval()

    def evaluate(self, model: nn.Module, rows: Rows, *, batch_size: int, num_classes: int, device: torch.device,
                 dtype: torch.dtype) -> dict[str, float]:
        return evaluate(model, rows, batch_size=batch_size, num_classes=num_classes, device=device, dtype=dtype)
